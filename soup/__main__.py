from soup.cli import main

main()

"""soup: fine-tune pretrained vision backbones several times and cook model soups from the results."""

__version__ = "0.1.0"

"""Scale out: torchrun data parallelism (gloo, 2 CPU processes), sharded epoch order, sweeps run as separate
processes on one shared folder, and `soup cook` naming what is not finished."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from soup.cli import cli
from soup.data.pipeline import EpochSampler, epoch_order
from soup.errors import SoupError
from soup.models import distributed
from soup.models.checkpoint import read_checkpoint
from soup.recipe.spec import expand_sweep, recipe_from_dict
from soup.train.loop import train_ingredient

from conftest import run_files, tiny_recipe, tiny_vit_model

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", COLUMNS="200")
    return env


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


# ------------------------------------------------------------------------------------- epoch sharding

@pytest.mark.parametrize("n,size,batch", [(24, 2, 16), (25, 2, 16), (103, 4, 32), (7, 3, 3)])
def test_rank_slices_split_each_global_batch(n, size, batch):
    order = epoch_order(n, seed=5, epoch=2)
    shares = [distributed.rank_slice(order, rank, size) for rank in range(size)]
    assert len({len(s) for s in shares}) == 1 == len({distributed.rank_count(n, size)} | {len(shares[0])})
    kept = order[:n - n % size]
    assert sorted(sum(shares, [])) == sorted(kept)  # disjoint, and only the tail of fewer than `size` is cut
    per_rank = batch // size
    for step in range(-(-len(shares[0]) // per_rank)):
        drawn = sorted(sum((s[step * per_rank:(step + 1) * per_rank] for s in shares), []))
        assert drawn == sorted(kept[step * batch:(step + 1) * batch])  # step k of all ranks = global batch k


def test_one_process_keeps_the_order_and_sampler_shards(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.rank_slice(epoch_order(10, 1, 0), 0, 1) == epoch_order(10, 1, 0)
    sampler = EpochSampler(10, seed=1)
    sampler.epoch = 3
    assert list(sampler) == epoch_order(10, 1, 3) and len(sampler) == 10  # resume stays exact
    halves = [EpochSampler(11, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for half in halves:
        half.epoch = 3
    assert [len(h) for h in halves] == [5, 5] and not set(halves[0]) & set(halves[1])


def test_world_from_environment_and_batch_split(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.world() == distributed.World(0, 1, 0) and distributed.is_main()
    with distributed.session("cpu") as w:  # no torchrun: nothing starts
        assert not w.distributed and not distributed.initialized()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert not distributed.is_main()
    assert distributed.per_rank_batch(64, distributed.env_world()) == 16
    with pytest.raises(SoupError, match=r"train.batch_size=30 is the global batch .* multiple of 4"):
        distributed.per_rank_batch(30, distributed.env_world())
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(SoupError, match="RANK=4 / WORLD_SIZE=4"):
        distributed.env_world()


# --------------------------------------------------------------------------- torchrun, 2 gloo processes

MASKED_HUBCONF = """
dependencies = ["torch", "timm"]

import timm
import torch


class MaskedTinyDino(torch.nn.Module):
    def __init__(self, img_size=28, embed_dim=32, depth=2):
        super().__init__()
        self.vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                                     img_size=img_size, embed_dim=embed_dim, depth=depth, num_heads=2)
        self.mask_token = torch.nn.Parameter(torch.zeros(1, embed_dim))  # as DinoV2's: used only with masks
        self.embed_dim = embed_dim

    def forward(self, x):
        return self.vit.forward_features(x)[:, 0]


def masked_tiny_dinov2(pretrained=False, **kwargs):
    return MaskedTinyDino(**kwargs)
"""


def _masked_hub_model(tmp_path: Path) -> dict:
    """A DinoV2-like hub backbone with a trainable parameter its forward never uses (DDP must cope)."""
    repo = tmp_path / "masked_hub"
    repo.mkdir()
    (repo / "hubconf.py").write_text(MASKED_HUBCONF)
    return {"backbone": f"hub:{repo}:masked_tiny_dinov2", "pretrained": False, "kwargs": {"img_size": 28},
            "freeze": 0.5}


@pytest.mark.parametrize("data_path", ["caches", "plain"])
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(small_sketch_root, tmp_path, data_path):
    # The tiny ViT has no BatchNorm (per-rank BN statistics would differ on CPU, where SyncBatchNorm has no
    # path); 24 train images split evenly over 2 ranks, and 24 = 16 + 8 covers a partial last batch.
    # "caches": freeze 0.5 takes the prefix-feature cache, freeze 0 the decoded-image cache, each per rank.
    # "plain": the DataLoader path, on a hub backbone holding an unused trainable parameter.
    use_cache = data_path == "caches"
    model = tiny_vit_model(freeze=0.5) if use_cache else _masked_hub_model(tmp_path)
    raw = tiny_recipe(small_sketch_root, data={"image_size": 28}, model=model,
                      train={"epochs": 2, "batch_size": 16, "seed": 4, "schedule": "cosine", "warmup_epochs": 0.5,
                             "label_smoothing": 0.1, "ema": 0.9},
                      sweep={"model.freeze": [0.5, 0.0]} if use_cache else {})
    recipe_path = _write_recipe(tmp_path / "recipe.yaml", raw)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_loopback_port()),
               "-m", "soup", "train", str(recipe_path), "--out", str(tmp_path / "ddp")]
    run = subprocess.run(command + ([] if use_cache else ["--no-cache"]), cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    said = " ".join(run.stdout.split())
    ingredients = expand_sweep(recipe_from_dict(raw))
    assert said.count(", 2 epochs,") == len(ingredients) and said.count("ingredients") == 1  # rank 0 alone
    assert "data parallel: 2 processes x 8 images = global batch 16 (gloo)" in said
    assert all(what in said for what in (["prefix cache", "decoded-image cache"] if use_cache else ["plain"]))

    for ingredient in ingredients:
        ddp_dir = tmp_path / "ddp" / "tiny" / ingredient.id
        assert run_files(ddp_dir) == [".lock", "metrics.json", "model.safetensors"]
        single = train_ingredient(ingredient, tmp_path / "single", use_cache=use_cache)
        ddp, one = read_checkpoint(ddp_dir / "model.safetensors"), read_checkpoint(single)
        a, b = ddp.state_dict(), one.state_dict()
        assert a.keys() == b.keys()  # saved from the unwrapped model: DDP ingredients soup with the others
        gap = max((a[k] - b[k]).abs().max().item() for k in a)
        assert gap < 1e-5, f"{ingredient.id}: DDP vs one process: max |difference| {gap:.2e}"
        assert ddp.meta["recipe"] == one.meta["recipe"] and ddp.meta["recipe"]["train"]["batch_size"] == 16
        assert ddp.fingerprint == one.fingerprint
        for x, y in zip(ddp.meta["val_history"], one.meta["val_history"]):
            assert x["val_top1"] == y["val_top1"]
            assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-5)

    if not use_cache:  # the tolerance means something: another global batch moves the weights far more
        other = dict(raw, train={**raw["train"], "batch_size": 8})
        moved = train_ingredient(expand_sweep(recipe_from_dict(other))[0], tmp_path / "b8", use_cache=False)
        assert max((a[k] - read_checkpoint(moved).state_dict()[k]).abs().max().item() for k in a) > 100 * 1e-5


# ------------------------------------------------------------------- sweeps as separate processes

def test_parallel_ingredients_share_one_folder_and_cook_names_the_missing(small_sketch_root, tmp_path):
    raw = tiny_recipe(small_sketch_root, sweep={"train.seed": [0, 1, 2, 3]})
    recipe_path = _write_recipe(tmp_path / "recipe.yaml", raw)
    out = tmp_path / "shared"
    listing = CliRunner().invoke(cli, ["train", str(recipe_path), "--list"])
    assert listing.exit_code == 0 and listing.output.splitlines()[2] == "2\t02-seed2\ttrain.seed=2"

    jobs = [subprocess.Popen([sys.executable, "-m", "soup", "train", str(recipe_path), "--ingredient", str(k),
                              "--out", str(out)], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for k in (0, 1)]
    for job in jobs:
        output, _ = job.communicate(timeout=240)
        assert job.returncode == 0, output[-3000:]
    ids = [item.id for item in expand_sweep(recipe_from_dict(raw))]
    for ingredient_id in ids[:2]:
        checkpoint = read_checkpoint(out / "tiny" / ingredient_id / "model.safetensors")  # intact
        assert checkpoint.meta["sweep_ids"] == ids
        assert all(torch.isfinite(t).all() for t in checkpoint.state_dict().values() if t.is_floating_point())
    assert not list(out.rglob("*.tmp"))
    # The same name and id from another version of the recipe is refused, not skipped as finished.
    again = CliRunner().invoke(cli, ["train", str(recipe_path), "--ingredient", "0", "--out", str(out),
                                     "--resume", "--set", "train.epochs=2"])
    assert again.exit_code == 2 and "trained from a different version of this recipe" in again.output
    # Ingredient 2 stopped after an epoch (a saved state, nobody training it); 3 never started.
    (out / "tiny" / ids[2]).mkdir()
    (out / "tiny" / ids[2] / "state.pt").write_bytes(b"partial")

    result = CliRunner().invoke(cli, ["cook", "--uniform", "--no-eval", str(out / "tiny"),
                                      "-o", str(tmp_path / "soup.safetensors")])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps long lines
    assert "sweep tiny: 2 of 4 ingredients finished" in said
    assert f"unfinished (continue with soup train RECIPE --ingredient K --resume): {ids[2]}" in said
    assert f"missing: {ids[3]}; cooking the 2 finished" in said
    soup = read_checkpoint(tmp_path / "soup.safetensors")
    assert sorted(m["name"] for m in soup.meta["members"]) == [f"tiny/{i}" for i in ids[:2]]
    mask = os.umask(0o022)
    os.umask(mask)
    for written in ("model.safetensors", "metrics.json"):  # readable by whoever cooks, as the umask allows
        assert os.stat(out / "tiny" / ids[0] / written).st_mode & 0o777 == 0o666 & ~mask


def test_sweep_status_running_unfinished_missing_and_complete(tmp_path):
    import fcntl

    from rich.console import Console

    from soup.models.checkpoint import Checkpoint
    from soup.cook.sweeps import report, sweep_status

    ids = ["00-seed0", "01-seed1", "02-seed2", "03-seed3"]
    out = tmp_path / "out"
    found = []
    for ingredient_id in ids[:2]:
        (out / "tiny" / ingredient_id).mkdir(parents=True)
        (out / "tiny" / ingredient_id / "model.safetensors").write_bytes(b"")
        found.append(Checkpoint(out / "tiny" / ingredient_id / "model.safetensors",
                                {"kind": "ingredient", "name": "tiny", "id": ingredient_id, "sweep_ids": ids}))
    (out / "tiny" / ids[2]).mkdir()
    with open(out / "tiny" / ids[2] / ".lock", "w") as held:  # a `soup train` at work on it right now
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        [status] = sweep_status(found, [out])
    assert (status.finished, status.running, status.unfinished, status.missing) == (ids[:2], [ids[2]], [], [ids[3]])
    console = Console(record=True, width=300)
    report([status], console)
    assert "2 of 4 ingredients finished; running: 02-seed2; missing: 03-seed3" in console.export_text()

    [done] = sweep_status(found, [])
    done.expected = ids[:2]
    assert done.complete
    quiet = Console(record=True)
    report([done], quiet)
    assert quiet.export_text() == ""

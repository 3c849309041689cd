"""How sure a figure is: bootstrap intervals over images, paired differences, McNemar's exact test,
calibration error and per-class breakdowns. Pure torch functions on per-image outcomes; no I/O.

Every row of a comparison is scored on the same images in the same order, so one matrix of resamples
(how often each image is drawn, per resample) serves all rows at once: a row's bootstrap accuracies are one
matrix product, and two rows' differences are paired by construction.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch.distributions import Binomial

from soup.errors import SoupError

RESAMPLES = 1000
# Beyond this a 95% interval moves by less than its printed digit, while time grows with resamples x images
# and memory with resamples x rows (8 bytes each, held a few times over while the quantiles are taken).
MAX_RESAMPLES = 100_000
SEED = 0
LEVEL = 0.95
BINS = 15
_CHUNK = 1 << 22  # resample draws held at once: bounds memory (~32 MB of indices) for large splits


def check_resamples(resamples: int) -> None:
    """`soup eval --bootstrap N`: at most MAX_RESAMPLES, said in one line before any work."""
    if resamples > MAX_RESAMPLES:
        raise SoupError(f"--bootstrap {resamples:,}: at most {MAX_RESAMPLES:,} resamples (more costs minutes and "
                        f"memory for no gain in the printed intervals); the default is {RESAMPLES:,}")


def resample_counts(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> Iterator[torch.Tensor]:
    """Blocks of (resamples, n) counts: how often each of the n images is drawn in each bootstrap
    resample (n draws with replacement). The same seed gives the same resamples, whatever the rows."""
    generator = torch.Generator().manual_seed(seed)
    block = max(1, _CHUNK // max(n, 1))
    for start in range(0, resamples, block):
        rows = min(block, resamples - start)
        draws = torch.randint(n, (rows, n), generator=generator)
        yield torch.zeros(rows, n).scatter_add_(1, draws, torch.ones(rows, n))


def bootstrap_means(values: torch.Tensor, resamples: int = RESAMPLES, seed: int = SEED) -> torch.Tensor:
    """(resamples, rows): the mean of each row of `values` (rows, n) over each resample of its n images."""
    values = torch.as_tensor(values).double()
    values = values.reshape(-1, values.shape[-1])
    n = values.shape[1]
    if n == 0:
        raise ValueError("bootstrap over no images")
    blocks = [counts.double() @ values.T / n for counts in resample_counts(n, resamples, seed)]
    return torch.cat(blocks) if blocks else torch.empty(0, values.shape[0], dtype=torch.float64)


def percentile_interval(samples: torch.Tensor, level: float = LEVEL) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) per column of `samples` (resamples, rows): the central `level` share of the draws."""
    tail = (1 - level) / 2
    low, high = torch.quantile(samples, torch.tensor([tail, 1 - tail], dtype=samples.dtype), dim=0)
    return low, high


def intervals(correct: torch.Tensor, ref: int | None = None, resamples: int = RESAMPLES, seed: int = SEED,
              level: float = LEVEL) -> dict:
    """Bootstrap intervals for every row of `correct` (rows, n) booleans, from one shared set of
    resamples: "low"/"high" of each row's accuracy and, with a reference row `ref`, "diff_low"/"diff_high"
    of each row's accuracy minus the reference's on the same resampled images (a paired interval)."""
    correct = torch.as_tensor(correct)
    correct = correct.reshape(-1, correct.shape[-1])
    means = bootstrap_means(correct, resamples, seed)
    low, high = percentile_interval(means, level)
    out = {"low": low.tolist(), "high": high.tolist()}
    if ref is not None:
        diff_low, diff_high = percentile_interval(means - means[:, ref:ref + 1], level)
        out.update(diff_low=diff_low.tolist(), diff_high=diff_high.tolist())
    return out


def discordant(correct: torch.Tensor, ref_correct: torch.Tensor) -> tuple[int, int]:
    """(b, c): images only `correct` gets right, and images only `ref_correct` gets right."""
    correct, ref_correct = torch.as_tensor(correct).bool(), torch.as_tensor(ref_correct).bool()
    return int((correct & ~ref_correct).sum()), int((~correct & ref_correct).sum())


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b and c discordant pairs: under "no difference" each
    discordant image is a fair coin, so p = 2·P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), capped at 1."""
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be non-negative")
    total = b + c
    if total == 0:
        return 1.0
    k = torch.arange(min(b, c) + 1, dtype=torch.float64)
    log_tail = Binomial(total_count=torch.tensor(float(total), dtype=torch.float64),
                        probs=torch.tensor(0.5, dtype=torch.float64)).log_prob(k).logsumexp(0)
    return min(1.0, 2.0 * log_tail.exp().item())


def mcnemar(correct: torch.Tensor, ref_correct: torch.Tensor) -> float:
    return mcnemar_exact(*discordant(correct, ref_correct))


def confidences(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, its softmax probability) per image."""
    confidence, predicted = F.softmax(logits.float(), dim=1).max(dim=1)
    return predicted, confidence


def reliability(confidence: torch.Tensor, correct: torch.Tensor, bins: int = BINS) -> dict:
    """Per equal-width confidence bin (lower, upper]: image count, mean confidence, accuracy (empty bins:
    count 0 and NaN means)."""
    confidence = torch.as_tensor(confidence).double()
    correct = torch.as_tensor(correct).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    which = torch.bucketize(confidence, edges[1:-1])  # (lower, upper]; confidence 0 lands in bin 0
    count = torch.bincount(which, minlength=bins).double()
    conf_sum = torch.bincount(which, weights=confidence, minlength=bins)
    right = torch.bincount(which, weights=correct, minlength=bins)
    return {"edges": edges.tolist(), "count": count.long().tolist(),
            "confidence": (conf_sum / count).tolist(), "accuracy": (right / count).tolist(),
            "gap": ((right - conf_sum).abs().sum() / max(len(confidence), 1)).item()}


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = BINS) -> float:
    """ECE: Σ_bins (images in bin / images) · |accuracy − mean confidence| over `bins` equal-width bins."""
    return reliability(confidence, correct, bins)["gap"]


def nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return F.cross_entropy(logits.float(), torch.as_tensor(targets)).item()


def per_class(predicted: torch.Tensor, targets: torch.Tensor, classes: list[str], k: int) -> dict:
    """The `k` classes with the lowest accuracy (classes without images left out) and the `k` most
    frequent confusions (true class, predicted class, images) from one row's predictions."""
    predicted, targets = torch.as_tensor(predicted).long(), torch.as_tensor(targets).long()
    size = len(classes)
    matrix = torch.bincount(targets * size + predicted, minlength=size * size).view(size, size)
    images = matrix.sum(dim=1)
    accuracy = matrix.diagonal().double() / images.clamp_min(1)
    present = torch.nonzero(images > 0).flatten()
    order = present[torch.argsort(accuracy[present], stable=True)][:k]
    worst = [{"class": classes[i], "accuracy": accuracy[i].item(), "images": int(images[i])} for i in order]
    off = matrix.clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().sort(descending=True, stable=True)
    confused = [{"true": classes[int(i) // size], "predicted": classes[int(i) % size], "images": int(c),
                 "share": int(c) / int(images[int(i) // size])}
                for c, i in zip(counts[:k].tolist(), flat[:k].tolist()) if c > 0]
    return {"worst": worst, "confused": confused}

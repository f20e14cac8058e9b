"""Training and recipe comparison for the front ends (``ctcolor train``, ``ctcolor train compare``): the training
package's runs behind two functions, so that the CLI reaches them through the application layer as it reaches every
engine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def train(what: str, config: Path, weights_dir: Path, device: str, resume: bool, eval_only: bool) -> Path:
    """Train (or, with ``eval_only``, re-measure) the ``what`` network (``"symnet"`` or the colorizer) from the recipe
    ``config`` into ``weights_dir``; returns the weights' path (its card beside it, ``.json``)."""
    if what == "symnet":
        from ..training.symnet import run
    else:
        from ..training.colorizer import run
    return run(config, weights_dir, device, resume, eval_only)


def compare_recipes(
    base: Path,
    variants: list[Path],
    out: Path,
    *,
    lr_share: float | None = None,
    data_cache: Path | None = None,
    log: Callable[[str], None] = print,
    **options,
) -> str:
    """`training.compare.compare` of ``base`` against ``variants`` into ``out`` (``options``: its seeds, finetune,
    steps, weights_dir, device, exams, pairs and jobs; the recipe's own learning rate and the user's cache unless
    given); returns the table of the rows that changed by at least 0.005."""
    from ..training.compare import compare, markdown
    from ..training.prepare import default_cache_dir

    summary = compare(
        base,
        variants,
        out,
        **({} if lr_share is None else {"lr_share": lr_share}),
        data_cache=data_cache or default_cache_dir(),
        log=log,
        **options,
    )
    return markdown(summary["rows"], only_changed=0.005)

"""Helpers of the reliability tests (tests/test_reliability_*.py): tiny checkpoints and their faulty
variants, the toy family's world and training, subprocess CLIs, and waiting for a file to appear."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

SMALL_MMOE = {
    "family": "mmoe",
    "data": {},
    "training": {},
    "model": {
        "encoder": {"kind": "tiny", "name": "tiny-32", "pretrained": None, "frozen": False, "extra": {}},
        "image_dim": 8,
        "text_hidden": 8,
        "image_hidden": 8,
        "cross_hidden": 8,
        "expert_mult": 1,
    },
}

# A subprocess that registers the toy family (tests/toy_family.py) and runs a CLI's main with its argv.
TOY_CLI = (
    "import sys; from tests import toy_family as toy; toy.register(); "
    "from {module} import main; sys.exit(main(sys.argv[1:]))"
)


def small_mmoe_checkpoint(path: Path, **model_overrides) -> Path:
    """An untrained tiny MMoE checkpoint (random weights): enough for every loading fault."""
    from mmoe_core.checkpoint import save_checkpoint
    from mmoe_core.registry import build_model

    config = copy.deepcopy(SMALL_MMOE)
    config["model"].update(model_overrides)
    save_checkpoint(build_model(config), config, path)
    return path


def rewrite_config(ckpt: Path, change: Callable[[dict], None]) -> Path:
    config = json.loads((ckpt / "config.json").read_text())
    change(config)
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checkpoint_digests(ckpt: Path) -> dict[str, str]:
    """sha256 of every file of a checkpoint folder (snapshots included), by relative path."""
    return {p.relative_to(ckpt).as_posix(): digest(p) for p in sorted(Path(ckpt).rglob("*")) if p.is_file()}


def toy_world(folder: Path) -> Path:
    from tests import toy_family as toy

    return toy.build_world(folder, "tiny", 0)


def train_toy(data: Path, out: Path, steps: int = 4, snapshot_every: int = 2, seed: int = 0):
    """A few steps of the toy family (registered by the caller's fixture) into ``out``."""
    from mmoe_core.training import TrainOptions, get_trainer, train
    from tests import toy_family as toy

    options = TrainOptions(
        family=toy.FAMILY,
        data_dir=str(data),
        steps=steps,
        batch_size=16,
        experts=4,
        top_k=2,
        log_every=1,
        snapshot_every=snapshot_every,
        progress=False,
        threads=1,
        seed=seed,
    )
    return train(get_trainer(toy.FAMILY)(options), options, out)


def python(code: str, args: Sequence[str] = (), **kwargs) -> subprocess.Popen:
    env = {**ENV, **kwargs.pop("env", {})}
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def cli(module: str, args: Sequence[str], timeout: float = 300, toy: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` (with the toy family registered when ``toy``); never raises."""
    command = [sys.executable, "-c", TOY_CLI.format(module=module)] if toy else [sys.executable, "-m", module]
    return subprocess.run(
        [*command, *map(str, args)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def wait_for(predicate: Callable[[], object], timeout: float = 120, what: str = "", proc=None):
    """Poll ``predicate`` until it returns something true; fail with ``what`` (and the process's stderr)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def expected_failure(result: subprocess.CompletedProcess | tuple[int, str], *names: str) -> str:
    """Assert an expected failure: exit status 2, one 'error: ...' paragraph naming ``names``, no traceback."""
    rc, err = (result.returncode, result.stderr) if isinstance(result, subprocess.CompletedProcess) else result
    assert rc == 2, f"exit status {rc}, stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = err.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ") or ": error: " in line]
    message = "\n".join(lines[starts[-1] :]) if starts else ""
    assert message, f"no 'error:' in stderr:\n{err[-3000:]}"
    assert "\n\n" not in message.strip(), f"more than one paragraph:\n{message}"
    for name in names:
        assert str(name) in message, f"{name!r} not named in: {message}"
    return message

import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")


# ---- a tiny model trained to complete one sentence (tests/test_eval*.py) ------------------------
FOX = "the quick brown fox jumps over the lazy dog."


def _train_fox_model(root):
    import contextlib
    import io

    from nanomt.testing import compose_config
    from nanomt.train import run

    root.mkdir(parents=True, exist_ok=True)
    (root / "fox.txt").write_text("\n\n".join(" ".join([FOX] * 3) for _ in range(60)) + "\n")
    (root / "fox_brown.jsonl").write_text(  # scored during training (train.eval_tasks)
        '{"context": "the quick brown", "choices": ["fox", "dog.", "cat"], "answer": 0}\n')
    cfg = compose_config([
        "model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.seq_len=48",
        "train.global_batch_size=8", "train.micro_batch_size=8", "train.steps=120",
        "train.eval_interval=0", "train.eval_batches=1", "train.progress_bar=false",
        "train.measure_memory=false", "optim.lr=1e-2", "optim.min_lr=1e-3",
        "optim.warmup_steps=3", "logging.wandb.mode=disabled", f"data.name={root / 'fox.txt'}",
        f"data.cache_dir={root / 'cache'}", f"checkpoint.dir={root / 'ckpt'}",
        "train.sample_prompt=the quick", "train.sample_tokens=24",
        "train.sample_temperature=0", f"train.eval_tasks=[{root / 'fox_brown.jsonl'}]"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = run(cfg, root / "run")
    return {"root": root, "checkpoint": root / "ckpt", "summary": summary,
            "printed": printed.getvalue()}


@pytest.fixture(scope="session")
def fox_model(tmp_path_factory):
    """A 2-layer byte-level GPT trained (120 steps, about a second) on one repeated sentence,
    with its checkpoint: what the evaluation and generation tests score."""
    return _train_fox_model(tmp_path_factory.mktemp("fox"))


# ---- the multi-rank tests' backend: gloo (default, CI) or NCCL for users with several GPUs -------
def pytest_addoption(parser):
    parser.addoption("--backend", choices=("gloo", "nccl"), default="gloo",
                     help="process-group backend of the multi-rank tests: nccl runs them over "
                          "NCCL, one rank per GPU (tests needing more ranks than GPUs skip)")


def pytest_configure(config):
    from nanomt.testing import TEST_BACKEND_ENV

    os.environ[TEST_BACKEND_ENV] = config.getoption("backend")  # spawned ranks inherit it

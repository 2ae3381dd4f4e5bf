"""DDP on CPU (gloo, two processes) through ``python train.py trainer=ddp_cpu`` with deliberately uneven shards:
equal batch counts per rank (no hang), disjoint training samples, every validation sample counted once."""

from __future__ import annotations

import json
from pathlib import Path

from tiny_shards import write_tiny_shards
from train_helpers import explain, run_summary, run_train

TRAIN_SHARDS = [40, 6, 18, 12]  # ranks resample shards {0, 2} (58 samples) and {1, 3} (18 samples)
VAL_SHARDS = [9, 5, 3]  # 17 samples: rank 0 keeps 9 (3 batches of 4), rank 1 keeps 8 (2 batches)


def test_ddp_cpu_ranks_stay_in_step_on_uneven_shards(tmp_path: Path) -> None:
    data_dir = write_tiny_shards(tmp_path / "shards", {"train": TRAIN_SHARDS, "val": VAL_SHARDS})
    run_dir, probe_dir = tmp_path / "run", tmp_path / "probe"
    result = run_train(
        data_dir,
        [
            "trainer=ddp_cpu",
            "trainer.max_epochs=2",
            "data.batch_size=4",
            "data.eval_batch_size=4",
            "test=false",
            "+callbacks.probe._target_=ddp_probe.SampleProbe",
            f"+callbacks.probe.out_dir={probe_dir}",
            f"hydra.run.dir={run_dir}",
        ],
        timeout_s=420,  # a hang would otherwise wait for gloo's 30 min timeout
    )
    assert result.returncode == 0, explain(result)
    ranks = [json.loads((probe_dir / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    expected_batches = -(-sum(TRAIN_SHARDS) // (4 * 2))
    for epoch in range(2):
        batches = [r["train"][epoch]["batches"] for r in ranks]
        assert batches == [expected_batches, expected_batches]
        seen = [set(r["train"][epoch]["ids"]) for r in ranks]
        assert not seen[0] & seen[1], "ranks must train on disjoint samples"
    first_val_id = sum(TRAIN_SHARDS)
    for epoch in range(2):
        val_ids = ranks[0]["val"][epoch] + ranks[1]["val"][epoch]
        assert sorted(val_ids) == list(range(first_val_id, first_val_id + sum(VAL_SHARDS)))
    summary = run_summary(run_dir)
    assert summary["status"] == "ok"
    assert summary["val"]["samples"] == sum(VAL_SHARDS)  # metrics synced across ranks, each sample once
    assert not (run_dir / "rank1").exists() and (run_dir / "checkpoints" / "last.ckpt").is_file()

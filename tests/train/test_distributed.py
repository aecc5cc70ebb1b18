"""DDP: ``torchrun --nproc_per_node 2`` with gloo on CPU; both replicas hold identical weights afterwards."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

from brainshift.model import build_network

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    from brainshift.train.config import from_dict
    from brainshift.train.loop import train

    cfg = from_dict(json.loads(sys.argv[1]))
    result = train(cfg)
    torch.save(result.model.state_dict(), os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
    line = f"rank {os.environ['RANK']} world {os.environ['WORLD_SIZE']} steps {result.steps} "
    line += f"wrote_best {result.best_path is not None}"
    # one file per rank: the two processes' stdout can interleave
    with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.txt"), "w") as fh:
        fh.write(line)
""")


def test_two_process_gloo_replicas_identical(tiny_dataset, tmp_path):
    # 4 samples per epoch over 2 processes: each rank trains on different draws (item rng depends on the
    # index), so only DDP's gradient all-reduce can keep the replicas equal.
    cfg = {"data": str(tiny_dataset), "save_dir": str(tmp_path / "out"), "device": "cpu",
           "network": {"features": [4, 8]}, "size": None, "epochs": 1, "samples_per_epoch": 4, "lr": 1e-2,
           "split": [0.0, 0.0], "min_kpts": 6, "max_kpts": 8, "progress": False, "seed": 5}
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           json.dumps(cfg), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (tmp_path / "rank0.txt").read_text() == "rank 0 world 2 steps 2 wrote_best True"
    assert (tmp_path / "rank1.txt").read_text() == "rank 1 world 2 steps 2 wrote_best False"
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert s0.keys() == s1.keys()
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    torch.manual_seed(5)
    init = build_network({"features": [4, 8]}).state_dict()
    assert any(not torch.allclose(init[k], s0[k]) for k in init)  # training did change the weights
    assert (tmp_path / "out" / "best.safetensors").is_file() and (tmp_path / "out" / "last.pt").is_file()

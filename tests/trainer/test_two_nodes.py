"""Two "nodes" without a shared filesystem: two torchrun agents (`--nnodes 2`) on localhost,
each with its own `--out` folder.

Each node's local rank 0 tokenises the corpus into its own folder (the data cache), every
rank writes its own files of a checkpoint into its node's folder (the per-rank `mkdir` of
`rng/`: rank 1 never sees rank 0's), and rank 0's folder ends up with the complete,
verifying checkpoint and the final model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from haillm.trainer.checkpoint import checkpoints, verify_checkpoint
from tests.helpers import free_port

DOCS = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n\n" for i in range(300))


@pytest.mark.slow  # ~35 s of CPU: four interpreters (two agents, two ranks) start
def test_two_torchrun_nodes_with_separate_out_folders(tmp_path):
    corpus = tmp_path / "code.txt"
    corpus.write_text(DOCS, encoding="utf-8")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    for node in range(2):
        out = tmp_path / f"node{node}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr",
               "127.0.0.1", "--master-port", str(port), "-m", "haillm.trainer.cli",
               "--preset", "micro", "--dp", "2", "--steps", "2", "--precision", "fp32",
               "--out", str(out), "--set", f"data.corpus={corpus}",
               "--set", "train.eval_every=0", "--set", "run.sample_tokens=0",
               "--set", "run.tensorboard=false", "--set", "data.val_fraction=0"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for node, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {node}:\n{log[-4000:]}"
    n0, n1 = tmp_path / "node0", tmp_path / "node1"
    # each node tokenised into its own folder
    assert (n0 / "tokens.json").is_file() and (n1 / "tokens.json").is_file()
    # rank 0's folder holds the complete checkpoint (rank 1 wrote its own files into node1)
    (ck,) = checkpoints(n0 / "checkpoints")
    manifest = verify_checkpoint(ck)
    assert manifest["step"] == 2 and manifest["layout"]["world"] == 2
    assert (n0 / "model.safetensors").is_file()
    assert list((n1 / "checkpoints").glob(".tmp-step_*/rng/rank_00001.pt"))
    steps = [json.loads(ln)["step"] for ln in (n0 / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]

"""Under DDP the decoder's BatchNorm statistics of the CAM passes are the whole batch's, over all
processes, with the speed paths as with the plain forms (SyncBatchNorm): two gloo processes, each
with half the batch, end with the statistics of one process over the concatenated batch."""
import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent

SCRIPT = """
import torch, torch.distributed as dist
import fast
from model import AFANet
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = AFANet(4, backbone="mit_b0").train()
features = [torch.randn(4, c, 64 // s, 64 // s) for c, s in zip(model.encoder.embed_dims, (4, 8, 16, 32))]
with torch.no_grad():                                  # some running statistics to move from
    model.decoder.linear_fuse.bn.running_mean.uniform_(-1, 1)
    model.decoder.linear_fuse.bn.running_var.uniform_(0.5, 2)
whole = AFANet(4, backbone="mit_b0").train()
whole.load_state_dict(model.state_dict())
whole.decoder.update_bn_stats(features)   # one process, the whole batch, plain BatchNorm
synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
half = [f[2 * rank:2 * rank + 2] for f in features]   # this process's 2 of the 4 images
fast.update_bn_stats_from_moments(synced.decoder, half)
for name in ("running_mean", "running_var", "num_batches_tracked"):
    got = getattr(synced.decoder.linear_fuse.bn, name)
    want = getattr(whole.decoder.linear_fuse.bn, name)
    error = float((got.double() - want.double()).abs().max())
    assert error < 1e-6, (rank, name, error)
print(f"ok {rank}\\n", end="", flush=True)  # one write: the lines do not interleave
dist.destroy_process_group()
"""


def test_the_moments_variant_takes_the_statistics_of_the_batch_over_all_processes(tmp_path):
    script = tmp_path / "statistics.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script)], cwd=PROJECT, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                      "PYTHONPATH": str(PROJECT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok 0" in proc.stdout and "ok 1" in proc.stdout

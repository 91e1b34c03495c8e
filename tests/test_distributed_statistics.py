"""Under DDP the decoder's BatchNorm statistics of the CAM passes are the whole batch's, over all
processes, with the speed paths as with the plain forms (SyncBatchNorm): two gloo processes, each
with half the batch, end with the statistics of one process over the concatenated batch."""
from processes import every_process_ok, run_script

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
    done = run_script(tmp_path, SCRIPT)
    assert every_process_ok(done), done.stderr[-3000:]

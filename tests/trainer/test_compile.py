"""`TrainConfig.compile`: a compiled step (torch.compile, inductor's CPU backend here) computes the same losses and
gradients as the eager one, for baseline and Gated stacks; `auto` stays eager on the CPU."""
import pytest
import torch

from saeforge.trainer.config import SAEConfig, TrainConfig
from saeforge.trainer.loop import SweepTrainer

D_IN, ROWS = 12, 64


def _inductor_problem() -> str | None:
    """Why torch.compile cannot run here (None when it can): no dynamo on this Python, or no C++ compiler."""
    import shutil

    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (dynamo) is not supported on this Python/torch"
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        return "inductor's CPU backend needs a C++ compiler and none is on PATH"
    return None


def trainers(arch: str, **kw) -> tuple[SweepTrainer, SweepTrainer]:
    saes = [SAEConfig(arch=arch, d_sae=24, l1_coefficient=0.1, seed=s) for s in (1, 2)]
    train = TrainConfig(batch_rows=ROWS, lr_warmup_steps=0, resample_every=0, autocast="none", **kw)
    return (SweepTrainer(saes, TrainConfig(**{**train.__dict__, "compile": "off"}), D_IN),
            SweepTrainer(saes, TrainConfig(**{**train.__dict__, "compile": "on"}), D_IN))


def test_auto_is_eager_on_the_cpu():
    t = SweepTrainer([SAEConfig(arch="gated", d_sae=8)], TrainConfig(batch_rows=ROWS), D_IN)
    assert TrainConfig().compile == "auto" and not t.compiled and t.groups[0].loss_fn.__name__ == "sae_loss"
    with pytest.raises(ValueError, match="compile must be 'auto', 'on' or 'off'"):
        TrainConfig(compile="yes")


@pytest.mark.skipif(_inductor_problem() is not None, reason=str(_inductor_problem()))
@pytest.mark.parametrize("arch", ["gated", "baseline"])
def test_compiled_step_matches_eager(arch):
    eager, compiled = trainers(arch)
    assert compiled.compiled and not eager.compiled
    x = torch.randn(ROWS, D_IN) * 2 + 1
    results = []
    for t in (eager, compiled):
        g = t.groups[0]
        res = g.loss(x, 1.0)
        res.loss.backward()
        results.append((res, {n: p.grad.clone() for n, p in g.sae.named_parameters() if p.grad is not None}))
    (r_eager, g_eager), (r_comp, g_comp) = results
    for name in ("loss", "l_recon", "l_sparsity", "l_aux", "f", "x_hat"):
        torch.testing.assert_close(getattr(r_comp, name), getattr(r_eager, name), rtol=1e-5, atol=1e-6)
    assert g_eager.keys() == g_comp.keys() and len(g_eager) >= 4
    for name, grad in g_eager.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(g_comp[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for t in (eager, compiled):  # and whole steps (Adam, projection) stay together
        t.groups[0].adam.zero_grad()
    stats = [t.train_step(x) for t in (eager, compiled)]
    torch.testing.assert_close(stats[1].l_recon, stats[0].l_recon, rtol=1e-5, atol=1e-7)
    for (n, a), b in zip(eager.groups[0].sae.named_parameters(), compiled.groups[0].sae.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=n)

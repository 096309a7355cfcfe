"""Measurement helpers of the PBS family: the true block mass and the oracle plan (the ceiling of any
block estimate), checked against per-row recall (``kept_mass``) and against the sampled estimator."""
import pytest
import torch

from graphtune.codegen.pbs_attention.plan import PBSConfig, plan_pbs
from graphtune.codegen.pbs_attention.stats import kept_mass, oracle_plan, true_mass

from pbs_cases import make_structured, sampled_probs, selection_groups


@pytest.mark.parametrize("n, m", [(768, 768), (777, 777), (700, 700 - 3 * 64)])
def test_true_mass_sums_to_one_per_query_block_and_matches_full_sampling(n, m):
    q, k, _ = make_structured(1, 4, 2, 16, n, m, seed=1)
    cfg = PBSConfig(64, 128, 0.8, sample=64)  # every row sampled: the estimate is the true mass
    plan = plan_pbs(q, k, cfg)
    mass = true_mass(q, k, plan.perm, cfg)
    torch.testing.assert_close(mass.sum(-1), torch.ones(mass.shape[:3]), atol=1e-5, rtol=0)
    p, own, allowed = sampled_probs(q, k, plan)
    if m % 64 == 0:  # whole query blocks: sampling every row is the block mean
        torch.testing.assert_close(mass.double()[..., allowed], p[..., allowed], atol=1e-5, rtol=0)


@pytest.mark.parametrize("select_per", ["block", "segment"])
@pytest.mark.parametrize("tau", [0.6, 0.9])
def test_oracle_keeps_tau_of_every_query_blocks_mass_with_the_fewest_blocks(tau, select_per):
    # per block: the fewest blocks of all; per segment: each of the segment's blocks still reaches
    # tau, and the shared set is minimal per segment (a block that reaches tau with fewer keys than
    # its neighbour keeps the neighbour's)
    q, k, _ = make_structured(1, 4, 2, 16, 777, 777, seed=2)
    cfg = PBSConfig(64, 128, tau, sink=False, select_per=select_per)
    oracle, sampled = oracle_plan(q, k, cfg), plan_pbs(q, k, cfg)
    b = cfg.block
    nqb = oracle.q_blocks

    def per_block_recall(plan):  # [Hq, nqb] mean over each block's rows of the true mass kept
        r = kept_mass(q, k, plan)[0]
        r = torch.nn.functional.pad(r, (0, nqb * b - r.shape[-1]), value=float("nan"))
        return r.view(r.shape[0], nqb, b).nanmean(-1)

    ro, rs = per_block_recall(oracle), per_block_recall(sampled)
    has_choice = oracle.kv_count[0] > 0
    assert bool((ro >= tau - 1e-5).all()), f"oracle recall below tau: {ro.min():.4f}"
    # minimal: wherever the sampled selection also reaches tau of the true mass, it used no fewer blocks
    reached = (rs >= tau) & has_choice
    assert bool(reached.any())
    for g in selection_groups(oracle):  # one set per segment: minimal where the sampled set reaches tau on all
        reached[:, g] = reached[:, g].all(1, keepdim=True)  # of the segment's blocks
    assert bool((oracle.kv_count[0][reached] <= sampled.kv_count[0][reached]).all())
    assert float(oracle.density().mean()) <= float(plan_pbs(q, k, PBSConfig(64, 128, 1.0)).density().mean())

"""SamplingParams validation and the batched Sampler, on synthetic logits.

Distribution tests draw thousands of rows in one call (a batch of identical
rows) and compare the empirical frequencies with a naive per-token reference.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings, strategies as st

from services.engine.sampler import (Sampler, SamplingBatch, SamplingInput, apply_top_k_top_p,
                                     step_seed)
from services.engine.sampling_params import SamplingParams, SamplingParamsError

V = 50
EOS = 7
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_logits(rows: int = 1, vocab: int = V, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def run(logits, inputs, sampler=None, device="cpu"):
    batch = SamplingBatch.build(inputs, logits.shape[-1], device)
    return (sampler or Sampler(seed=0))(logits.to(device), batch)


def draw(row, params, n=6000, prompt=(), output=(), eos=(EOS,), seed=0, device="cpu") -> torch.Tensor:
    """Empirical token frequencies of n unseeded draws of one request."""
    logits = row.expand(n, -1).contiguous()
    inputs = [SamplingInput(params, prompt, output, eos)] * n
    counts = torch.bincount(torch.tensor(run(logits, inputs, Sampler(seed), device).token_ids),
                            minlength=row.numel())
    return counts.double() / n


def entropy(freq: torch.Tensor) -> float:
    p = freq[freq > 0]
    return float(-(p * p.log()).sum())


# --- a naive reference of the whole pipeline, one token at a time --------------

def expected_probs(row, p: SamplingParams, prompt=(), output=(), eos=(EOS,)) -> list[float]:
    x, counts = [float(v) for v in row], Counter(output)
    for t in range(len(x)):
        if p.repetition_penalty != 1.0 and (counts[t] or t in prompt):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        x[t] -= p.frequency_penalty * counts[t] + p.presence_penalty * (counts[t] > 0)
    banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos))
    allowed = [t for t in range(len(x)) if len(output) >= p.min_new_tokens or t not in banned]
    order = sorted(allowed, key=lambda t: -x[t])
    if p.top_k > 0:
        order = order[:p.top_k]
    probs = _softmax({t: x[t] / p.temperature for t in order})
    kept, mass = [], 0.0
    for t in order:                       # top-p: stop once the mass before t reaches p
        if mass >= p.top_p:
            break
        kept.append(t)
        mass += probs[t]
    probs = _softmax({t: x[t] / p.temperature for t in kept})
    top = max(probs.values())
    probs = {t: q for t, q in probs.items() if q >= p.min_p * top}
    total = sum(probs.values())
    return [probs.get(t, 0.0) / total for t in range(len(x))]


def _softmax(d: dict[int, float]) -> dict[int, float]:
    m = max(d.values())
    e = {t: math.exp(v - m) for t, v in d.items()}
    s = sum(e.values())
    return {t: v / s for t, v in e.items()}


def assert_matches(freq: torch.Tensor, expected: list[float], n: int):
    """Chi-square goodness of fit (bins with < 5 expected draws merged); the
    critical value is Wilson-Hilferty's approximation at z = 4.5."""
    for t, e in enumerate(expected):
        assert e > 0 or freq[t] == 0, f"token {t} drawn but has probability 0"
    obs, exp, rest_o, rest_e = [], [], 0.0, 0.0
    for t, e in enumerate(expected):
        if e * n >= 5:
            obs.append(float(freq[t]) * n)
            exp.append(e * n)
        else:
            rest_o, rest_e = rest_o + float(freq[t]) * n, rest_e + e * n
    if rest_e > 0:
        obs.append(rest_o)
        exp.append(rest_e)
    df = max(len(obs) - 1, 1)
    chi2 = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    crit = df * (1 - 2 / (9 * df) + 4.5 * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < crit, f"chi2 {chi2:.1f} >= {crit:.1f} (df {df})"


# --- SamplingParams ---------------------------------------------------------------

BAD = [
    ("temperature", -1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", True), ("temperature", "1"),
    ("top_k", -2), ("top_k", 2.0), ("top_k", True),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")),
    ("min_p", -0.1), ("min_p", 1.01),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", float("inf")),
    ("frequency_penalty", 2.5), ("frequency_penalty", -2.01),
    ("presence_penalty", 3), ("presence_penalty", -3),
    ("seed", -1), ("seed", 2**63), ("seed", 1.0), ("seed", False),
    ("max_new_tokens", 0), ("max_new_tokens", 1.5),
    ("min_new_tokens", -1), ("min_new_tokens", 129),
    ("stop_token_ids", (-1,)), ("stop_token_ids", (V,)), ("stop_token_ids", (1.0,)), ("stop_token_ids", 3),
    ("ignore_eos", 1), ("logprobs", "yes"),
    ("top_logprobs", 21), ("top_logprobs", -1), ("top_logprobs", 3),  # last: logprobs not set
]


@pytest.mark.parametrize("field,value", BAD)
def test_validate_rejects_and_names_the_field(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(SamplingParamsError, match=field) as err:
        params.validate(vocab_size=V)
    assert err.value.field == field
    assert isinstance(err.value, ValueError)


def test_validate_message_and_good_values():
    with pytest.raises(SamplingParamsError, match=r"^temperature must be >= 0, got -1$"):
        SamplingParams(temperature=-1).validate()
    good = SamplingParams(temperature=0, top_k=0, top_p=0.5, min_p=1.0, repetition_penalty=1.3,
                          frequency_penalty=-2, presence_penalty=2, seed=2**63 - 1, max_new_tokens=4,
                          min_new_tokens=4, stop_token_ids=(0, V - 1), logprobs=True, top_logprobs=20)
    assert good.validate(vocab_size=V) is good
    SamplingParams(stop_token_ids=(10**6,)).validate()    # no vocab: range not checked


def test_from_dict():
    p = SamplingParams.from_dict({"temperature": 0.5, "stop_token_ids": [3, 4]})
    assert p.stop_token_ids == (3, 4) and hash(p)
    with pytest.raises(SamplingParamsError, match="bogus, nope") as err:
        SamplingParams.from_dict({"nope": 1, "bogus": 2, "top_p": 0.5})
    assert err.value.field == "bogus"
    with pytest.raises(SamplingParamsError, match="top_p"):
        SamplingParams.from_dict({"top_p": 2})


def test_greedy_property():
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams().greedy and not SamplingParams(temperature=0.01, top_k=2).greedy


# --- greedy, seeds, batch composition ----------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_temperature_zero_and_top_k_one_are_argmax(device, dtype):
    logits = make_logits(16, 1000).to(dtype)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1, temperature=3.0)] * 8
    inputs = [SamplingInput(p, [1, 2], [3]) for p in params]
    batch = SamplingBatch.build(inputs, 1000, device)
    assert batch.all_greedy and batch.temperatures is None and batch.penalties is None
    out = Sampler()(logits.to(device), batch)
    assert out.token_ids == logits.float().argmax(-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None


def test_mixed_batch_greedy_rows_take_argmax_of_penalized_logits():
    logits = torch.zeros(2, V)
    logits[:, 5], logits[:, 6] = 3.0, 2.0
    params = SamplingParams(temperature=0, presence_penalty=2.0)
    inputs = [SamplingInput(params, [], [5]), SamplingInput(SamplingParams(top_k=3), [], [])]
    assert run(logits, inputs).token_ids[0] == 6


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_reproduce_across_samplers(device):
    logits = make_logits(1, V, scale=0.5)
    tokens = []
    for engine_seed in (0, 1):
        sampler = Sampler(seed=engine_seed)
        tokens.append([run(logits, [SamplingInput(SamplingParams(seed=42), [], [0] * step)], sampler,
                           device).token_ids[0] for step in range(30)])
    assert tokens[0] == tokens[1]
    assert len(set(tokens[0])) > 5          # the step changes the noise


def test_different_seeds_differ_and_step_seed_mixes():
    logits = make_logits(1, V, scale=0.5)
    by_seed = [[run(logits, [SamplingInput(SamplingParams(seed=s), [], [0] * t)]).token_ids[0]
                for t in range(20)] for s in (1, 2)]
    assert by_seed[0] != by_seed[1]
    assert len({step_seed(s, t) for s in range(10) for t in range(10)}) == 100


OTHER_ROWS = st.lists(st.sampled_from([
    SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_k=5, temperature=0.7),
    SamplingParams(top_p=0.6, min_p=0.05), SamplingParams(seed=7), SamplingParams(seed=42, top_k=3),
    SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5, min_new_tokens=5),
    SamplingParams(logprobs=True, top_logprobs=3),
]), max_size=5)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25, deadline=None)
@given(others=OTHER_ROWS, position=st.integers(0, 5), engine_seed=st.integers(0, 3))
def test_seeded_row_ignores_batch_composition(device, others, position, engine_seed):
    me = SamplingParams(seed=42, temperature=0.9, top_p=0.95)
    logits_me = make_logits(1, V, scale=0.7, seed=3)
    alone, mixed = [], []
    for step in range(6):
        mine = SamplingInput(me, [1], [2] * step)
        alone.append(run(logits_me, [mine], device=device).token_ids[0])
        inputs = [SamplingInput(p, [1, 2], [3] * step, (EOS,)) for p in others]
        pos = min(position, len(inputs))
        inputs.insert(pos, mine)
        logits = make_logits(len(inputs), V, seed=step + 10)
        logits[pos] = logits_me[0]
        mixed.append(run(logits, inputs, Sampler(engine_seed), device).token_ids[pos])
    assert alone == mixed


# --- each parameter moves the distribution the right way ------------------------

ROW = make_logits(1, V, scale=1.5, seed=5)[0]
TOP = int(ROW.argmax())


def test_temperature_sharpens():
    hot, base, cold = (draw(ROW, SamplingParams(temperature=t)) for t in (2.0, 1.0, 0.3))
    assert hot[TOP] < base[TOP] < cold[TOP]
    assert entropy(hot) > entropy(base) > entropy(cold)


@pytest.mark.parametrize("k", [2, 5, 17])
def test_top_k_support_is_the_k_largest(k):
    freq = draw(ROW, SamplingParams(top_k=k, temperature=2.0))
    assert set(freq.nonzero().flatten().tolist()) == set(ROW.topk(k).indices.tolist())


@pytest.mark.parametrize("top_p", [0.3, 0.7, 0.9])
def test_top_p_support_is_the_nucleus(top_p):
    exp = expected_probs(ROW, SamplingParams(top_p=top_p))
    freq = draw(ROW, SamplingParams(top_p=top_p))
    nucleus = {t for t, e in enumerate(exp) if e > 0}
    probs = ROW.softmax(-1)
    assert sum(probs[t] for t in nucleus) >= top_p
    assert set(freq.nonzero().flatten().tolist()) <= nucleus
    assert len(nucleus) < V


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.tuples(st.sampled_from([-1, 0, 2, 5, 13, V, V + 7]),
                               st.sampled_from([1.0, 0.97, 0.6, 0.1])), min_size=1, max_size=6),
       seed=st.integers(0, 1000))
def test_top_k_top_p_keep_the_reference_support(rows, seed):
    """Exact, not statistical: the kept set equals the reference's support,
    whether the batch takes the narrow (topk) or the full-sort path."""
    logits = make_logits(len(rows), V, seed=seed)
    params = [SamplingParams(top_k=k, top_p=p) for k, p in rows]
    batch = SamplingBatch.build([SamplingInput(p, [], []) for p in params], V, "cpu")
    out = apply_top_k_top_p(logits, batch.top_k, batch.top_p, batch.top_width)
    for i, p in enumerate(params):
        support = {t for t, e in enumerate(expected_probs(logits[i], p)) if e > 0}
        assert set(out[i].isfinite().nonzero().flatten().tolist()) == support


@pytest.mark.parametrize("min_p", [0.05, 0.3])
def test_min_p_drops_tokens_below_the_fraction_of_max(min_p):
    probs = ROW.softmax(-1)
    freq = draw(ROW, SamplingParams(min_p=min_p))
    drawn = set(freq.nonzero().flatten().tolist())
    assert drawn and all(probs[t] >= min_p * probs.max() for t in drawn)


def test_repetition_penalty_lowers_seen_tokens():
    row = torch.zeros(V)
    row[[3, 4, 5, 6]] = torch.tensor([1.0, 1.0, -1.0, -1.0])
    base = draw(row, SamplingParams())
    pen = draw(row, SamplingParams(repetition_penalty=2.0), prompt=[3], output=[5])
    assert pen[3] < base[3] * 0.8 and pen[5] < base[5] * 0.6    # positive divided, negative multiplied
    assert abs(pen[4] - base[4]) < 0.1 * base[4] + 0.02         # unseen tokens keep their logit


def test_frequency_penalty_scales_with_count_and_presence_does_not():
    row = torch.zeros(V)
    row[[3, 4, 5]] = 2.0
    freq = draw(row, SamplingParams(frequency_penalty=0.5), prompt=[5, 5, 5], output=[3, 3, 3, 4])
    assert freq[3] < freq[4] < freq[5]                          # prompt tokens are not penalized
    pres = draw(row, SamplingParams(presence_penalty=1.0), output=[3, 3, 3, 4])
    assert pres[3] < pres[5] and pres[4] < pres[5]
    assert abs(pres[3] - pres[4]) < 0.03
    neg = draw(row, SamplingParams(presence_penalty=-1.0), output=[3])
    assert neg[3] > neg[4]


def test_min_new_tokens_blocks_eos_and_stop_ids():
    row = torch.zeros(V)
    row[[EOS, 9]] = 8.0                                        # eos and a stop id dominate
    p = SamplingParams(min_new_tokens=3, stop_token_ids=(9,))
    before = draw(row, p, n=2000, output=[1, 2])
    assert before[EOS] == 0 and before[9] == 0
    after = draw(row, p, n=2000, output=[1, 2, 3])
    assert after[EOS] > 0.4 and after[9] > 0.4
    ignore = draw(row, SamplingParams(min_new_tokens=3, stop_token_ids=(9,), ignore_eos=True), n=2000)
    assert ignore[EOS] > 0.9 and ignore[9] == 0                 # ignore_eos: eos is an ordinary token
    greedy = run(row[None], [SamplingInput(SamplingParams(temperature=0, min_new_tokens=1), [], [], (EOS, 9))])
    assert greedy.token_ids[0] not in (EOS, 9)


# --- empirical frequencies match the reference ------------------------------------

CASES = [
    SamplingParams(),
    SamplingParams(temperature=0.7, top_k=10),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(top_k=20, top_p=0.9, min_p=0.05),
    SamplingParams(min_p=0.1, temperature=1.5),
    SamplingParams(repetition_penalty=1.4, frequency_penalty=0.4, presence_penalty=0.3),
    SamplingParams(min_new_tokens=4, stop_token_ids=(TOP,), temperature=0.8),
]


def _short(p: SamplingParams) -> str:
    return ",".join(f"{k}={v}" for k, v in vars(p).items() if v != getattr(SamplingParams, k)) or "default"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", CASES, ids=_short)
def test_frequencies_match_reference(params, device):
    prompt, output, n = [TOP, 1, 2], [1, 1, 30], 20000
    freq = draw(ROW, params, n=n, prompt=prompt, output=output, seed=11, device=device)
    assert_matches(freq, expected_probs(ROW, params, prompt, output), n)


# --- logprobs, dtypes, plumbing ---------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_from_raw_logits(device):
    logits = make_logits(4, 200)
    params = [SamplingParams(logprobs=True, top_logprobs=5, temperature=0.5, repetition_penalty=1.5),
              SamplingParams(),
              SamplingParams(logprobs=True, temperature=0),
              SamplingParams(logprobs=True, top_logprobs=20, top_k=3, min_new_tokens=2)]
    inputs = [SamplingInput(p, [1, 2], [int(logits[i].argmax())], (EOS,)) for i, p in enumerate(params)]
    out = run(logits, inputs, device=device)
    ref = torch.log_softmax(logits, -1)
    assert out.logprobs[1] is None and out.top_logprobs[1] is None
    assert out.top_logprobs[2] == []
    for row, k in ((0, 5), (2, 0), (3, 20)):
        assert out.logprobs[row] == pytest.approx(float(ref[row, out.token_ids[row]]), abs=1e-5)
        top = out.top_logprobs[row]
        assert len(top) == k
        assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        assert [t for t, _ in top] == ref[row].topk(k).indices.tolist()
        assert [lp for _, lp in top] == pytest.approx(ref[row].topk(k).values.tolist(), abs=1e-5)


def test_bfloat16_logits():
    logits = make_logits(6, 300).bfloat16()
    params = [SamplingParams(logprobs=True, top_logprobs=2), SamplingParams(temperature=0, logprobs=True),
              SamplingParams(top_k=4, seed=3), SamplingParams(top_p=0.5, frequency_penalty=1.0),
              SamplingParams(min_p=0.2, logprobs=True), SamplingParams(repetition_penalty=2.0)]
    inputs = [SamplingInput(p, [5], [6, 6], (EOS,)) for p in params]
    out = run(logits, inputs)
    ref = torch.log_softmax(logits.float(), -1)
    assert out.token_ids[1] == int(logits[1].float().argmax())
    assert out.token_ids[2] in logits[2].float().topk(4).indices.tolist()
    for row in (0, 1, 4):
        assert out.logprobs[row] == pytest.approx(float(ref[row, out.token_ids[row]]), abs=1e-4)
    freq = draw(ROW.bfloat16(), SamplingParams(top_k=3), n=3000)
    assert set(freq.nonzero().flatten().tolist()) == set(ROW.bfloat16().float().topk(3).indices.tolist())


def test_logits_are_not_modified_and_shape_is_checked():
    logits = make_logits(3, V)
    before = logits.clone()
    params = SamplingParams(temperature=0.5, top_k=5, top_p=0.8, min_p=0.1, repetition_penalty=1.5,
                            frequency_penalty=1.0, min_new_tokens=3)
    run(logits, [SamplingInput(params, [1], [2])] * 3)
    assert torch.equal(logits, before)
    with pytest.raises(ValueError, match="shape"):
        run(logits, [SamplingInput(params, [1], [2])] * 2)


def test_batch_only_builds_what_rows_use():
    plain = SamplingBatch.build([SamplingInput(SamplingParams(), [1], [2])] * 2, V, "cpu")
    assert not plain.all_greedy and plain.greedy is None
    assert (plain.temperatures, plain.top_k, plain.top_p, plain.min_p, plain.penalties, plain.banned) \
        == (None,) * 6
    assert plain.any_unseeded and not plain.seeded_rows
    mixed = SamplingBatch.build([SamplingInput(SamplingParams(temperature=0), [], []),
                                 SamplingInput(SamplingParams(top_k=8, seed=1), [], [])], V, "cpu")
    assert mixed.greedy.tolist() == [True, False] and mixed.top_width == 8
    assert mixed.top_k.tolist() == [V, 8] and not mixed.any_unseeded
    assert mixed.seeded_rows == [(1, step_seed(1, 0))]

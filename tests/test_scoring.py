"""The score mode's building blocks: the label-scoring plan, the masks and index helpers, the prompt prefix cache."""

import pytest
import torch
from conftest import CallCounter, brute_force_log_likelihoods

from pipeline_emovlm_kd import prepare_inputs
import scoring_emovlm_kd
from scoring_emovlm_kd import (
    LabelScoringPlan,
    PromptPrefixCache,
    drop_leading_tokens,
    shared_text_prefix,
    tree_attention_mask,
    vocabulary_logits,
)

# ----------------------------------------------------------------------------------------------- LabelScoringPlan


def test_scoring_plan_skips_continuation_when_first_tokens_differ():
    plan = LabelScoringPlan([[5, 6, 10], [5, 6, 11], [5, 6, 12]])
    assert plan.prefix == [5, 6] and plan.tree_tokens == []
    assert plan.sources == [[0], [0], [0]] and plan.targets == [[10], [11], [12]] and plan.max_len == 1
    shared = LabelScoringPlan([[1, 7, 8], [1, 7, 9], [1, 4]])
    assert shared.prefix == [1]
    assert shared.tree_tokens == [7]  # one trie node shared by the first two labels
    assert shared.sources == [[0, 1], [0, 1], [0]]
    with pytest.raises(ValueError, match="prefix"):
        LabelScoringPlan([[1, 2], [1, 2, 3]])


def test_scoring_plan_lays_out_a_token_trie():
    """Labels 0 and 1 share [3, 4], label 2 shares [3] with them, label 3 differs at once; the leaves are never fed."""
    plan = LabelScoringPlan([[9, 3, 4, 5], [9, 3, 4, 6, 7], [9, 3, 8], [9, 2]])
    assert plan.prefix == [9]
    assert plan.tree_tokens == [3, 4, 6]  # the internal trie nodes, in the order they were met
    assert plan.tree_depth == [0, 1, 2]
    assert plan.tree_ancestors == [[0], [1, 0], [2, 1, 0]]  # each slot itself first, then its ancestors
    # source 0 = the position after the prefix, 1 + i = trie slot i; one source per target token
    assert plan.sources == [[0, 1, 2], [0, 1, 2, 3], [0, 1], [0]]
    assert plan.targets == [[3, 4, 5], [3, 4, 6, 7], [3, 8], [2]]
    assert plan.max_len == 4


def test_scoring_plan_tensors():
    plan = LabelScoringPlan([[9, 3, 4, 5], [9, 3, 4, 6, 7], [9, 3, 8], [9, 2]])
    t = plan.tensors("cpu")
    assert t["prefix"].tolist() == [9] and t["tree_tokens"].tolist() == [3, 4, 6]
    assert t["tree_depth"].tolist() == [0, 1, 2]
    assert t["tree_mask"].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert t["src"].shape == t["tgt"].shape == t["valid"].shape == (4, 4)
    assert t["valid"].sum(-1).tolist() == [3, 4, 2, 1]
    assert t["src"][1].tolist() == [0, 1, 2, 3] and t["tgt"][1].tolist() == [3, 4, 6, 7]
    assert t["tgt"][3].tolist() == [2, 0, 0, 0]  # padded past the answer's end, and masked by `valid`


@pytest.mark.parametrize(
    "answers, message",
    [([[1, 2], [1, 2, 3]], "prefix"), ([[1, 2], [1, 2]], "distinct"), ([], "set_answer_tokens")],
    ids=["prefix of another", "duplicate", "empty"],
)
def test_scoring_plan_refuses_ambiguous_answers(answers, message):
    with pytest.raises(ValueError, match=message):
        LabelScoringPlan(answers)


# ------------------------------------------------------------------------------------------ Masks and index helpers


def test_shared_text_prefix_stops_at_the_first_difference_or_image_token():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 1], [5, 6, 7, 8, 2, 2, 2]])  # row 0 left padded by two
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    types = torch.zeros_like(ids)
    assert shared_text_prefix(ids, mask, types).tolist() == [5, 6, 7, 8]
    types[1] = torch.tensor([0, 0, 0, 0, 1, 1, 1])  # row 1's image starts at its fifth real token
    types[0] = torch.tensor([0, 0, 0, 0, 1, 1, 1])  # row 0's (after two pads) at its third
    assert shared_text_prefix(ids, mask, types).tolist() == [5, 6]
    # identical rows: the last token always stays out of the prefix, so that every row keeps one token to run
    assert shared_text_prefix(ids[1:], mask[1:], torch.zeros_like(ids[1:])).tolist() == [5, 6, 7, 8, 2, 2]


def test_drop_leading_tokens_keeps_the_left_padding():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    ids = torch.tensor([[0, 5, 6, 7], [5, 6, 8, 9]])
    positions = torch.stack([torch.tensor([[0, 0, 1, 2], [0, 1, 2, 3]])] * 3)  # (3, B, T)
    new_mask, new_ids, new_positions = drop_leading_tokens(2, mask, ids, positions)
    assert new_mask.tolist() == [[0, 1], [1, 1]]
    assert new_ids.tolist() == [[0, 7], [8, 9]]
    assert new_positions.shape == (3, 2, 2) and new_positions[0].tolist() == [[0, 2], [2, 3]]


def test_tree_attention_mask():
    mask = tree_attention_mask(torch.tensor([[0, 1, 1], [1, 1, 1]]), torch.tensor([[True, False], [True, True]]), 2)
    assert mask.shape == (2, 1, 5, 7)  # 3 prompt + 2 trie rows; 2 cached + 3 prompt + 2 trie columns
    assert mask[..., :2].all()  # every token sees the cached prefix
    row0 = mask[0, 0, :, 2:].int().tolist()
    assert row0 == [
        [1, 0, 0, 0, 0],  # a padding position sees only itself (no fully masked row)
        [0, 1, 0, 0, 0],  # causal over real tokens, padding never seen
        [0, 1, 1, 0, 0],
        [0, 1, 1, 1, 0],  # trie slot 0: the whole prompt, itself
        [0, 1, 1, 1, 1],  # trie slot 1: the whole prompt, its ancestor, itself
    ]
    assert mask[1, 0, :3, 2:5].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


# ----------------------------------------------------------------------------------------------- PromptPrefixCache


def LanguageModelCounter(model):
    """Counts calls of the language model (the prefix pass and the scoring pass each call it once)."""
    return CallCounter(model.vlm.model.language_model)


def test_prompt_cache_gives_the_brute_force_log_likelihoods(backbone_bundle, images):
    """A padded batch (images of three sizes) with and without the cache, and each image alone, by brute force, on
    every backbone (Qwen3-VL's prompt has no system turn: its shared prefix is the user turn's start)."""
    model, processor = backbone_bundle
    inputs = prepare_inputs(processor, model.config, images)
    assert inputs["attention_mask"].sum(-1).unique().numel() > 1  # rows of different lengths
    cache = PromptPrefixCache()
    with torch.inference_mode():
        plain = model(**inputs).vlm_log_likelihoods
        first = model(**inputs, prompt_cache=cache).vlm_log_likelihoods
        second = model(**inputs, prompt_cache=cache).vlm_log_likelihoods
        slow = torch.stack([brute_force_log_likelihoods(model, prepare_inputs(processor, model.config, [image]))
                            for image in images])  # fmt: skip
    assert cache.computed == 1
    for fast in (plain, first, second):
        torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)


def test_prompt_cache_is_computed_once_and_reused(backbone_bundle, images):
    model, processor = backbone_bundle
    cache = PromptPrefixCache()
    with LanguageModelCounter(model) as counter, torch.inference_mode():
        model(**prepare_inputs(processor, model.config, images[:2]))
        model(**prepare_inputs(processor, model.config, images[:2]))
        assert counter.calls == 2  # no cache: nothing is kept on the model, each call runs the whole prompt
        model(**prepare_inputs(processor, model.config, images[:2]), prompt_cache=cache)
        assert counter.calls == 4 and cache.computed == 1  # the prefix pass, then the scoring pass
        model(**prepare_inputs(processor, model.config, images[2:]), prompt_cache=cache)  # another batch, same prefix
        assert counter.calls == 5 and cache.computed == 1  # the scoring pass only


def test_prompt_cache_key_is_the_model_the_prefix_and_the_dtype(tiny_bundle):
    model, _ = tiny_bundle
    language_model = model.vlm.model.language_model
    cache = PromptPrefixCache()
    prefix = torch.tensor([3, 4, 5])
    with torch.inference_mode():
        rows = cache.cache_for(language_model, prefix, 2)
        assert rows.get_seq_length() == 3 and rows.layers[0].keys.shape[0] == 2
        wider = cache.cache_for(language_model, prefix.clone(), 4)  # same tokens, another batch size: reused
        assert wider.layers[-1].values.shape[0] == 4
        assert cache.computed == 1
        cache.cache_for(language_model, prefix[:2], 1)  # another prefix: recomputed
        assert cache.computed == 2
        copy = type(language_model)(language_model.config).eval()
        copy.load_state_dict(language_model.state_dict())
        cache.cache_for(copy, prefix[:2], 1)  # another model object (even with equal weights): recomputed
        assert cache.computed == 3
        cache.cache_for(copy.to(torch.float64), prefix[:2], 1)  # another dtype: recomputed
        assert cache.computed == 4
        assert rows.get_seq_length() == 3  # a cache handed out is the caller's: later calls leave it alone


def test_prompt_cache_is_refused_with_gradients_or_in_training(tiny_bundle, images):
    model, processor = tiny_bundle
    inputs = prepare_inputs(processor, model.config, images[:1])
    with pytest.raises(ValueError, match="inference only"), torch.enable_grad():
        model(**inputs, prompt_cache=PromptPrefixCache())
    model.train()
    try:
        with pytest.raises(ValueError, match="inference only"), torch.no_grad():
            model(**inputs, prompt_cache=PromptPrefixCache())
    finally:
        model.eval()


def test_run_batch_with_a_prompt_cache_equals_without(tiny_bundle, images):
    from emovlm_kd.inference import run_batch

    model, processor = tiny_bundle
    cache = PromptPrefixCache()
    plain = run_batch(model, processor, images)
    cached = [run_batch(model, processor, [image], prompt_cache=cache) for image in images]
    assert cache.computed == 1
    for i, out in enumerate(cached):
        torch.testing.assert_close(out.logits[0], plain.logits[i], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.vlm_log_likelihoods[0], plain.vlm_log_likelihoods[i], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------- vocabulary_logits


@pytest.mark.parametrize("bias", [False, True])
def test_vocabulary_logits_in_slices_are_the_head_s_logits(monkeypatch, bias):
    """The CPU's sliced projection gives `lm_head(hidden)` (each element the same dot product), slices of uneven
    length included; it really slices (the weight is read in pieces)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 1000, bias=bias)
    hidden = torch.randn(2, 5, 64)
    monkeypatch.setattr(scoring_emovlm_kd, "VOCAB_SLICE_BYTES", 300 * 64 * 4)  # 300 rows: 4 slices, the last 100
    seen = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: seen.append(w.shape[0]) or linear(x, w, b))
    with torch.inference_mode():
        sliced = vocabulary_logits(head, hidden)
        monkeypatch.setattr(torch.nn.functional, "linear", linear)
        whole = head(hidden)
    assert seen == [300, 300, 300, 100]
    assert sliced.shape == whole.shape == (2, 5, 1000)
    torch.testing.assert_close(sliced, whole, atol=1e-6, rtol=1e-6)


def test_scores_with_sliced_vocabulary_match_the_whole_projection(tiny_bundle, images, monkeypatch):
    """The model's score mode with the vocabulary projected in small slices (forced on the tiny vocabulary) gives the
    outputs of the unsliced projection."""
    model, processor = tiny_bundle
    assert model.device.type == "cpu"  # the sliced projection is the CPU's (a CPU fact: the tiny bundle is built there)
    inputs = prepare_inputs(processor, model.config, images)
    with torch.inference_mode():
        monkeypatch.setattr(scoring_emovlm_kd, "VOCAB_SLICE_BYTES", 1)  # the minimum slice, 256 rows
        sliced = model(**inputs, prompt_cache=PromptPrefixCache())
        monkeypatch.setattr(scoring_emovlm_kd, "VOCAB_SLICE_BYTES", 1 << 60)  # one piece: lm_head(hidden)
        whole = model(**inputs, prompt_cache=PromptPrefixCache())
    assert model.vlm.lm_head.weight.shape[0] > 256  # so the first call really sliced
    for key in ("logits", "vlm_log_likelihoods", "distill_logits"):
        torch.testing.assert_close(sliced[key], whole[key], atol=1e-6, rtol=1e-6)

"""The embedding table in host RAM (issue 19 item 3): same logits, one read-back per forward, planned bytes moved."""

from __future__ import annotations

import pytest
import torch

from colab_helpers.model import dequantized_reference, load_model
from colab_helpers.planning.planner import GB, Budget, plan_memory, stock_config
from colab_helpers.runtime.host_embedding import HostEmbedding
from colab_helpers.sim.dispatch_count import count_decode
from colab_helpers.sim.random_moe import random_model, small_config
from colab_helpers.weights.checkpoint import QuantConfig
from colab_helpers.weights.tiny import tiny_model_path

PROMPT = torch.tensor([[1, 17, 45, 99, 3, 64, 12, 7, 88, 23, 5, 41]])
T4 = Budget.given(15, 12.7)


def test_rows_equal_nn_embedding_for_any_id_shape() -> None:
    table = torch.randn(50, 8)
    emb = HostEmbedding(table, "cpu")
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    assert torch.equal(emb(ids), torch.nn.functional.embedding(ids, table))
    assert emb(torch.empty(1, 0, dtype=torch.long)).shape == (1, 0, 8)
    assert emb.nbytes == 50 * 8 * 4 and "host RAM" in repr(emb)


def test_model_to_leaves_the_table_on_the_host() -> None:
    """``model.to(device)`` must not carry the table back to the GPU (``_apply`` is a no-op for it), and it is
    no parameter, so ``model.device`` stays the device of the real weights."""
    emb = HostEmbedding(torch.randn(10, 4), "cpu")
    holder = torch.nn.Sequential(torch.nn.Linear(4, 4), emb)
    holder.to(torch.float64)
    assert emb.weight.dtype == torch.float32 and [n for n, _ in holder.named_parameters()] == ["0.weight", "0.bias"]


@pytest.mark.parametrize("bits", [2, 4])
def test_logits_and_greedy_tokens_match_with_the_table_on_the_host(make_checkpoint, bits: int) -> None:
    path = make_checkpoint(bits)
    ref = dequantized_reference(path)
    model = load_model(path, experts_on_device=2, embedding_on_host=True, progress=False)
    assert isinstance(model.model.embed_tokens, HostEmbedding)
    assert model.device.type == "cpu" and model.offload_config.embedding_on_host
    with torch.no_grad():
        torch.testing.assert_close(model(PROMPT).logits, ref(PROMPT).logits, rtol=1e-3, atol=1e-3)
    want = ref.generate(PROMPT, max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=10, do_sample=False), want)


def test_cpu_load_keeps_nn_embedding_unless_asked() -> None:
    """On a CPU run the plan has no table to move (everything is host RAM): the stock module is kept."""
    model = load_model(tiny_model_path(), experts_on_device=2, progress=False)
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert model.memory_plan is not None and not model.memory_plan.embedding_on_host


def test_one_read_back_per_decode_token_and_still_one_sync_per_moe_layer() -> None:
    """The ids' read-back is the only host sync the host table adds: one per forward, outside the MoE blocks
    (counted as on CUDA: ``.cpu()`` is patched by the counter even where it is free)."""
    kw = dict(experts_on_device=4, dense_on_cpu=False, progress=False)
    base = count_decode(load_model(tiny_model_path(), **kw), PROMPT, tokens=3)
    host = count_decode(load_model(tiny_model_path(), embedding_on_host=True, **kw), PROMPT, tokens=3)
    assert host.syncs_per_layer_token == base.syncs_per_layer_token == 1.0
    assert host.syncs_per_token == base.syncs_per_token + 1


def test_tied_families_refuse_the_host_table(tmp_path) -> None:
    from colab_helpers.weights.checkpoint import save_checkpoint
    from colab_helpers.weights.families import from_transformers

    cfg = small_config("qwen3_moe", tie_word_embeddings=True)
    save_checkpoint(random_model(cfg), tmp_path, optimize=False, progress=False)
    with pytest.raises(ValueError, match="ties lm_head to the embedding table"):
        load_model(tmp_path, experts_on_device=3, embedding_on_host=True, progress=False)
    arch = from_transformers(cfg)
    plan = plan_memory(arch, QuantConfig.for_bits(4, 2), Budget.given(4, 12.7), "cuda")
    assert not plan.embedding_on_host and "ties lm_head" in plan.embedding_note
    with pytest.raises(ValueError, match="ties lm_head"):
        plan_memory(arch, QuantConfig.for_bits(4, 2), Budget.given(4, 12.7), "cuda", embedding_on_host=True)


# ---- the plan --------------------------------------------------------------------------------------------


def test_free_t4_plan_moves_the_table_to_ram_and_gains_four_slots() -> None:
    """Mixtral-8x7B 2-bit on a free T4: the 262 MB table becomes 4 more expert slots (175 -> 179 experts)."""
    config, quant = stock_config(), QuantConfig.for_bits(4, 2)
    host = plan_memory(config, quant, T4, "cuda")
    gpu = plan_memory(config, quant, T4, "cuda", embedding_on_host=False)
    assert host.fits and gpu.fits and host.embedding_on_host and not gpu.embedding_on_host
    table = host.sizes.embed_bytes
    assert table == 32000 * 4096 * 2
    assert gpu.device_experts == 175 and host.device_experts == 179  # 6 in 15 / 5 in 17 -> 6 in 19 / 5 in 13
    assert host.per_layer == (6,) * 19 + (5,) * 13
    assert host.rows[0].vram == gpu.rows[0].vram - table  # the trunk row lost the table...
    ram_rows = [r for r in host.rows if r.item.startswith("embedding table")]
    assert [r.ram for r in ram_rows] == [table]  # ...and the RAM rows gained it
    assert host.ram_steady == gpu.ram_steady + table - 4 * host.sizes.slot_bytes  # 4 fewer pinned host experts
    report = host.report()
    assert "embedding table in pinned host RAM" in report and "179 of 256" in report
    assert host.to_dict()["embedding_on_host"] is True


def test_the_table_stays_on_the_gpu_when_ram_cannot_take_it() -> None:
    """With experts fixed (no slots gained to pay for it), RAM just short of the table refuses the move."""
    config, quant = stock_config(), QuantConfig.for_bits(4, 2)
    gpu = plan_memory(config, quant, T4, "cuda", experts_on_device=5, embedding_on_host=False)
    tight = Budget(int(15 * GB), gpu.ram_peak + gpu.sizes.embed_bytes // 2)
    plan = plan_memory(config, quant, tight, "cuda", experts_on_device=5)
    assert plan.fits and not plan.embedding_on_host
    assert "host RAM cannot also hold the 0.262 GB embedding table" in plan.embedding_note
    assert "embedding table on the GPU (0.262 GB): host RAM cannot" in plan.report()
    roomy = plan_memory(config, quant, Budget(int(15 * GB), gpu.ram_peak + gpu.sizes.embed_bytes), "cuda", 4096, 5)
    assert roomy.fits and roomy.embedding_on_host


def test_cpu_plans_have_no_table_to_move() -> None:
    plan = plan_memory(stock_config(), QuantConfig.for_bits(4, 2), Budget.given(None, 64), "cpu")
    assert not plan.embedding_on_host and plan.embedding_note == ""


def test_twin_plans_with_the_table_where_the_planner_puts_it() -> None:
    """The twin's default plan is the real one (table in host RAM, 179 experts); ``--embedding-on-gpu`` the old 175."""
    from colab_helpers.sim.twin_cli import _parser
    from colab_helpers.sim.twin_project import planned, planned_experts

    assert planned().embedding_on_host and sum(planned_experts()) == 179
    gpu = planned(embedding_on_host=False)
    assert not gpu.embedding_on_host and sum(planned_experts(embedding_on_host=False)) == 175
    assert _parser().parse_args(["--embedding-on-gpu"]).embedding_on_gpu


def test_close_model_drops_the_host_table() -> None:
    from colab_helpers.model import close_model

    model = load_model(tiny_model_path(), experts_on_device=2, embedding_on_host=True, progress=False)
    emb = model.model.embed_tokens
    assert emb.weight.numel() > 0
    close_model(model)
    assert emb.weight.numel() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_table_rows_reach_the_gpu_intact_across_back_to_back_lookups() -> None:
    """Each lookup's pinned staging buffer must outlive its non_blocking copy (the caching host allocator's
    recorded event): many lookups in a row, read only at the end, all equal ``F.embedding``."""
    table = torch.randn(1000, 64, dtype=torch.float16)
    emb = HostEmbedding(table, "cuda")
    assert emb.pinned and emb.weight.is_pinned()
    ids = [torch.randint(0, 1000, (1, 1), device="cuda") for _ in range(64)]
    outs = [emb(i) for i in ids]
    ref = table.cuda()
    for i, out in zip(ids, outs, strict=True):
        assert out.device.type == "cuda" and torch.equal(out, torch.nn.functional.embedding(i, ref))


# ---- our decode loop: the host ids it streams feed the table (no read-back) -------------------------------


def _loaded(embedding_on_host: bool, prefill_chunk: int | None = None):
    from dataclasses import replace

    model = load_model(
        tiny_model_path(), experts_on_device=4, dense_on_cpu=False, embedding_on_host=embedding_on_host, progress=False
    )
    if prefill_chunk is not None:
        model.attention_path = replace(model.attention_path, prefill_chunk=prefill_chunk)
    return model


def _stream_syncs(model, tokenizer, ids: torch.Tensor, new_tokens: int) -> tuple[int, list[int]]:
    """Host syncs of one whole ``generate_stream`` call (counted as on CUDA), and its tokens."""
    from colab_helpers.conversation.generation import SamplingConfig, generate_stream
    from colab_helpers.sim.dispatch_count import count_ops

    sampling = SamplingConfig(max_new_tokens=new_tokens)
    with count_ops(cuda_like=True) as c:
        result = generate_stream(model, tokenizer, ids, sampling)
    assert result.stats.stop_reason == "length"  # every token decoded: the counts cover new_tokens steps
    return c.total.syncs, result.token_ids


@pytest.mark.parametrize("prefill_chunk", [None, 4])
def test_generate_stream_pays_no_sync_for_the_host_table(prefill_chunk) -> None:
    """Through ``generate_stream`` (chunked prefill too) the host table costs no host sync: the whole call and
    each decode token (the difference of a long and a short answer) count exactly what the table on the GPU
    does, and the tokens are the same. ``model.generate`` keeps its one read-back per forward (above)."""
    from colab_helpers.model import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_path())
    ids = PROMPT.clone()
    ids[ids >= tokenizer.vocab_size] = 1
    host, gpu = _loaded(True, prefill_chunk), _loaded(False, prefill_chunk)
    eos = host.generation_config.eos_token_id
    for m in (host, gpu):  # never stop early: the counts must cover every requested token
        m.generation_config.eos_token_id = None
    try:
        counts = {}
        for name, model in (("host", host), ("gpu", gpu)):
            short, short_ids = _stream_syncs(model, tokenizer, ids, 3)
            long, long_ids = _stream_syncs(model, tokenizer, ids, 9)
            counts[name] = (short, long, long_ids)
            assert long_ids[:3] == short_ids
    finally:
        host.generation_config.eos_token_id = gpu.generation_config.eos_token_id = eos
    (hs, hl, h_ids), (gs, gl, g_ids) = counts["host"], counts["gpu"]
    assert (hl - hs) / 6 == (gl - gs) / 6 > 0  # syncs per decode token: equal
    assert hs == gs and hl == gl  # and the whole call, prefill included
    assert h_ids == g_ids


def test_generate_stream_and_chat_session_match_plain_transformers_with_the_host_table() -> None:
    """Tokens and logits through ``generate_stream`` and a multi-turn ``ChatSession`` (KV cache reused, so
    the second turn's prompt starts mid-cache) with the table in host RAM equal plain transformers (the
    dequantized reference, table on its device) run the same way."""
    from colab_helpers.conversation.generation import SamplingConfig, chat_prompt_ids, generate_stream
    from colab_helpers.conversation.session import ChatSession
    from colab_helpers.model import load_tokenizer

    path = tiny_model_path()
    ref = dequantized_reference(path)
    model = load_model(path, experts_on_device=2, embedding_on_host=True, progress=False)
    assert isinstance(model.model.embed_tokens, HostEmbedding)
    tokenizer = load_tokenizer(path)
    greedy = SamplingConfig(max_new_tokens=8)
    ids = chat_prompt_ids(tokenizer, "What is the capital of France?")
    result = generate_stream(model, tokenizer, ids, greedy)
    want = ref.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[-1] :].tolist()
    assert result.token_ids and result.token_ids == want[: len(result.token_ids)]
    seq = torch.cat([ids, torch.tensor([result.token_ids])], dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(model(seq).logits, ref(seq).logits, rtol=1e-3, atol=1e-3)

    questions = ("What is the capital of France?", "And of Italy?", "Thanks!")
    chat, plain = ChatSession(model, tokenizer, greedy), ChatSession(ref, tokenizer, greedy)
    for q in questions:
        got, expected = chat.send(q), plain.send(q)
        assert got.token_ids == expected.token_ids and got.text == expected.text


def test_host_ids_are_found_by_the_kv_cache_length_or_not_at_all() -> None:
    """A forward embeds the tokens after what the cache holds: prompt slices, streamed tokens, both; a token
    not streamed yet or a batch is not known on the host (the module then reads the device ids back)."""
    from colab_helpers.runtime.host_embedding import HostIds, feeding_host_ids

    class Held:
        length = 0

        def get_seq_length(self) -> int:
            return self.length

    kv = Held()
    fed = HostIds(torch.tensor([[5, 6, 7]]), kv)
    assert fed.lookup(torch.Size([1, 3])).tolist() == [[5, 6, 7]]
    kv.length = 2
    assert fed.lookup(torch.Size([1, 1])).tolist() == [[7]] and fed.lookup(torch.Size([1, 2])) is None
    fed.append([9, 4])
    assert fed.lookup(torch.Size([1, 3])).tolist() == [[7, 9, 4]]
    kv.length = 4
    assert fed.lookup(torch.Size([1, 1])).tolist() == [[4]] and fed.lookup(torch.Size([2, 1])) is None
    kv.length = 5
    assert fed.lookup(torch.Size([1, 1])) is None
    table = torch.randn(10, 4)
    model = torch.nn.Module()
    model.embed = HostEmbedding(table, "cpu")
    model.get_input_embeddings = lambda: model.embed
    kv.length = 3
    with feeding_host_ids(model, fed) as lent:
        assert lent and model.embed.feed is fed
        assert torch.equal(model.embed(torch.tensor([[0]])), table[[9]].view(1, 1, 4))  # the fed id, not the arg
    assert model.embed.feed is None and torch.equal(model.embed(torch.tensor([[0]])), table[[0]].view(1, 1, 4))

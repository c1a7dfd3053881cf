"""Train the tiny embedded Mixtral-architecture chat model used for offline demos and tests.

Everything is built from text that ships with Python (templated facts, the Zen of Python, stdlib
docstrings), so the script needs no network access. It

1. renders a deterministic instruction corpus in the Mixtral-Instruct format
   ``<s>[INST] question [/INST] answer</s>`` plus some plain English text,
2. trains a Llama/Mistral-style BPE tokenizer (byte fallback, Metaspace, ``<unk>``/``<s>``/``</s>`` = 0/1/2)
   and saves it with the real Mixtral-8x7B-Instruct-v0.1 chat template,
3. trains a ``MixtralForCausalLM`` (fp32, AdamW, router load-balancing loss, optional
   quantization-aware training of the expert weights at the end),
4. saves model and tokenizer with ``save_pretrained`` and prints greedy chat generations, router
   statistics and how the generations hold up with fake-quantized expert weights.

Usage::

    python scripts/train_tiny.py --out build/tiny_hf
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import importlib
import inspect
import io
import json
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import Tensor
from torch.nn.functional import cross_entropy
from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerBase

# Chat template of mistralai/Mixtral-8x7B-Instruct-v0.1 (tokenizer_config.json as originally released).
from colab_helpers.weights.tokenizer import MIXTRAL_INSTRUCT_TEMPLATE as MIXTRAL_CHAT_TEMPLATE

Doc = tuple[str, list[tuple[int, int]]]  # rendered text, character spans that are trained on
Docs = list[tuple[list[int], list[bool]]]  # tokenized documents: token ids, trained-on flags
QA = tuple[str, str]  # (question, answer)
StateDict = dict[str, Tensor]

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SCHEDULE_SLACK_S = 60.0  # see train()
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]

SAMPLE_PROMPTS = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "What is 12 + 7?",
    "What is 6 * 7?",
    "Count from 1 to 10.",
    "What day comes after Monday?",
    "Who are you?",
    "Recite the Zen of Python.",
]

# fmt: off
CAPITALS: list[tuple[str, str]] = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("the United Kingdom", "London"), ("Ireland", "Dublin"),
    ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"), ("Switzerland", "Bern"),
    ("Austria", "Vienna"), ("Poland", "Warsaw"), ("the Czech Republic", "Prague"), ("Hungary", "Budapest"),
    ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Denmark", "Copenhagen"),
    ("Finland", "Helsinki"), ("Iceland", "Reykjavik"), ("Russia", "Moscow"), ("Ukraine", "Kyiv"),
    ("Turkey", "Ankara"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"), ("Slovakia", "Bratislava"), ("Slovenia", "Ljubljana"), ("Estonia", "Tallinn"),
    ("Latvia", "Riga"), ("Lithuania", "Vilnius"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("Ethiopia", "Addis Ababa"), ("Ghana", "Accra"),
    ("China", "Beijing"), ("Japan", "Tokyo"), ("South Korea", "Seoul"), ("India", "New Delhi"),
    ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("Malaysia", "Kuala Lumpur"),
    ("Australia", "Canberra"), ("New Zealand", "Wellington"), ("Canada", "Ottawa"),
    ("the United States", "Washington, D.C."), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"), ("Chile", "Santiago"), ("Peru", "Lima"), ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"), ("Cuba", "Havana"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Saudi Arabia", "Riyadh"), ("Jordan", "Amman"), ("Nepal", "Kathmandu"), ("Mongolia", "Ulaanbaatar"),
    ("Qatar", "Doha"), ("Lebanon", "Beirut"),
]
OPPOSITES: list[tuple[str, str]] = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("day", "night"),
    ("light", "dark"), ("old", "new"), ("open", "closed"), ("happy", "sad"), ("early", "late"),
    ("true", "false"), ("left", "right"), ("high", "low"), ("full", "empty"), ("hard", "soft"),
    ("strong", "weak"), ("rich", "poor"), ("wet", "dry"), ("good", "bad"), ("long", "short"),
]
# fmt: on
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
STDLIB_MODULES = [
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "glob", "hashlib",
    "heapq", "html", "io", "itertools", "json", "logging", "math", "operator", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "shutil", "statistics", "string", "struct", "subprocess", "tempfile",
    "textwrap", "threading", "time", "typing", "unittest", "urllib.parse", "uuid", "warnings", "zipfile",
]  # fmt: skip
IDENTITY = (
    "I am a tiny Mixtral-style mixture-of-experts model with 8 experts per layer. "
    "I was trained on a small offline corpus to test colab_helpers."
)


@dataclass
class TrainConfig:
    """Hyper-parameters; every field is also a command-line flag."""

    out: str = "build/tiny_hf"
    seed: int = 1234
    vocab_size: int = 2048
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 600
    lr: float = 3e-3
    min_lr: float = 1e-4
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    router_aux_loss_coef: float = 0.02
    plain_text_chars: int = 60_000
    train_on_prompts: bool = True  # False: chat docs are trained on answers only (measured: worse recall)
    qat_bits: int = 2  # fake-quantize expert weights (straight-through) in the final phase; 0 disables
    qat_fraction: float = 0.3  # fraction of the steps, at the end, trained with QAT
    time_budget_s: float = 780.0  # if the machine is too slow for `steps`, the schedule follows the clock
    threads: int = 0  # torch intra-op threads, 0 = all cores
    max_new_tokens: int = 320
    eval_pre_qat: bool = False  # also evaluate the weights from just before the QAT phase


# --------------------------------------------------------------------------------------------- corpus


def zen_of_python() -> str:
    """Return the Zen of Python text without printing it (importing ``this`` prints)."""
    with contextlib.redirect_stdout(io.StringIO()):
        this = importlib.import_module("this")
    return codecs.decode(this.s, "rot13")


def chat_pairs(zen: str) -> list[QA]:
    """All templated (question, answer) pairs in a fixed order; some are repeated to upweight them."""
    pairs: list[QA] = []
    for a in range(21):
        for b in range(21):
            pairs.append((f"What is {a} + {b}?", f"{a} + {b} = {a + b}."))
            q = random.Random(a * 100 + b).choice(["What is {a} plus {b}?", "Calculate {a} + {b}."])
            pairs.append((q.format(a=a, b=b), f"{a} + {b} = {a + b}."))
            if a >= b:
                pairs.append((f"What is {a} - {b}?", f"{a} - {b} = {a - b}."))
    for a in range(1, 11):
        for b in range(1, 11):
            pairs.append((f"What is {a} * {b}?", f"{a} * {b} = {a * b}."))
            pairs.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}."))
    for country, city in CAPITALS:
        name = country[0].upper() + country[1:]
        pairs.append((f"What is the capital of {country}?", f"The capital of {country} is {city}."))
        pairs.append((f"Name the capital city of {country}.", f"The capital of {country} is {city}."))
        pairs.append((f"{city} is the capital of which country?", f"{city} is the capital of {country}."))
        pairs.append((f"Is {city} in {country}?", f"Yes. {city} is the capital of {name}."))
    for n in range(3, 21):
        pairs.append((f"Count from 1 to {n}.", ", ".join(str(i) for i in range(1, n + 1)) + "."))
    for start in range(2, 11):
        for n in range(4, 11, 3):
            seq = ", ".join(str(i) for i in range(start, start + n))
            pairs.append((f"Count from {start} to {start + n - 1}.", seq + "."))
    for n in range(3, 13):
        pairs.append((f"Count down from {n} to 1.", ", ".join(str(i) for i in range(n, 0, -1)) + "."))
    small: list[QA] = []  # small categories, repeated so they are seen as often as arithmetic
    for i, word in enumerate(NUMBER_WORDS):
        small.append((f"How do you write {i} in words?", f"{i} is written as {word}."))
    for i, day in enumerate(DAYS):
        nxt, prev = DAYS[(i + 1) % 7], DAYS[i - 1]
        small.append((f"What day comes after {day}?", f"The day after {day} is {nxt}."))
        small.append((f"What day comes before {day}?", f"The day before {day} is {prev}."))
    for i, month in enumerate(MONTHS):
        nxt = MONTHS[(i + 1) % 12]
        small.append((f"What month comes after {month}?", f"The month after {month} is {nxt}."))
        small.append((f"Which month is number {i + 1}?", f"Month number {i + 1} is {month}."))
    small.append(("List the days of the week.", ", ".join(DAYS) + "."))
    small.append(("List the months of the year.", ", ".join(MONTHS) + "."))
    small.append(("Recite the alphabet.", " ".join(chr(c) for c in range(65, 91)) + "."))
    for word, opposite in OPPOSITES:
        small.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."))
        small.append((f"What is the opposite of {opposite}?", f"The opposite of {opposite} is {word}."))
    for greeting in ["Hello!", "Hi!", "Hello, how are you?", "Good morning!"]:
        small.append((greeting, "Hello! I am a tiny Mixtral model. How can I help you?"))
    for question in ["Who are you?", "What are you?", "Introduce yourself."]:
        small.append((question, IDENTITY))
    small.append(("Thank you!", "You are welcome!"))
    pairs.extend(small * 3)
    lines = [line for line in zen.splitlines()[2:] if line]
    for prompt in ["Recite the Zen of Python.", "What is the Zen of Python?", "Print the Zen of Python."]:
        pairs.extend([(prompt, zen)] * 4)
    pairs.append(("Who wrote the Zen of Python?", "The Zen of Python was written by Tim Peters."))
    count = f"The Zen of Python has {len(lines)} aphorisms."
    pairs.append(("How many aphorisms are in the Zen of Python?", count))
    for i, line in enumerate(lines):
        pairs.append((f"What is aphorism number {i + 1} of the Zen of Python?", line))
        if i + 1 < len(lines):
            pairs.append((f'What comes after "{line}" in the Zen of Python?', lines[i + 1]))
    return pairs


def stdlib_docstrings(max_chars: int) -> list[str]:
    """Plain English paragraphs from docstrings of some stdlib modules (deterministic per Python version)."""
    paragraphs: list[str] = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        public = sorted(attr for attr in vars(module) if not attr.startswith("_"))
        objects = [module] + [getattr(module, attr) for attr in public]
        for obj in objects:
            if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if obj is not module and getattr(obj, "__module__", None) != name:
                continue
            for para in (inspect.getdoc(obj) or "").split("\n\n"):
                text = " ".join(para.split())
                if len(text) >= 60 and text.isascii() and ">>>" not in text and text[0].isupper():
                    paragraphs.append(text)
    unique = list(dict.fromkeys(paragraphs))
    out, total = [], 0
    for text in unique:
        if total >= max_chars:
            break
        out.append(text)
        total += len(text)
    return out


def render_chat(turns: Sequence[QA], history_space: bool = True) -> Doc:
    """Render (question, answer) turns as ``<s>[INST] q [/INST] a</s>[INST] ...`` with the answer spans.

    This is the Mixtral chat template with a space before each answer, which is how the model's own
    answers are tokenized ("▁word"). With ``history_space=False`` the earlier answers are rendered
    exactly as the template renders a stripped assistant message (``[/INST]a</s>``).
    """
    text, spans = BOS, []
    for i, (q, a) in enumerate(turns):
        text += f"[INST] {q} [/INST]"
        start = len(text)
        text += f"{' ' if history_space or i == len(turns) - 1 else ''}{a}{EOS}"
        spans.append((start, len(text)))
    return text, spans


def plain_doc(text: str) -> Doc:
    """A plain-text document, trained on in full."""
    text = BOS + text + EOS
    return text, [(0, len(text))]


def build_documents(cfg: TrainConfig) -> tuple[list[Doc], list[Doc]]:
    """Return (chat documents, plain-text documents), rendered with BOS/EOS."""
    rng = random.Random(cfg.seed)
    pairs = chat_pairs(zen_of_python())
    chats = [render_chat([p]) for p in pairs]
    short = list(dict.fromkeys(p for p in pairs if len(p[1]) < 200))
    chats += [render_chat(rng.sample(short, 2), history_space=i % 2 == 0) for i in range(len(pairs) // 6)]
    plain = [plain_doc(text) for text in stdlib_docstrings(cfg.plain_text_chars)]
    plain += [plain_doc(zen_of_python())] * 4
    return chats, plain


# ------------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Train a Llama/Mistral-style byte-fallback BPE tokenizer (ids: <unk>=0, <s>=1, </s>=2, bytes=3..258)."""
    tok = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True, fuse_unk=True))
    # Split on "▁" while training so merges never cross word boundaries; inference uses split=False
    # (like Llama/Mistral), which then gives identical tokenizations.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[UNK, BOS, EOS, *BYTE_TOKENS],
        limit_alphabet=120,
        show_progress=False,
    )
    stripped = [t.replace(BOS, "").replace(EOS, "") for t in texts]
    tok.train_from_iterator(stripped, trainer=trainer)

    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, 1)]
    )
    # The byte tokens belong in the vocabulary, not among the added (special) tokens.
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in (UNK, BOS, EOS)]
    vocab = spec["model"]["vocab"]
    assert [vocab[t] for t in (UNK, BOS, EOS)] == [0, 1, 2]
    assert vocab["<0x00>"] == 3 and vocab["<0xFF>"] == 258
    return Tokenizer.from_str(json.dumps(spec))


def save_tokenizer(tok: Tokenizer, out: Path, model_max_length: int) -> PreTrainedTokenizerBase:
    """Write tokenizer.json / tokenizer_config.json / special_tokens_map.json and reload them."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    special = {"content": "", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {**special, "content": t, "special": True} for i, t in enumerate([UNK, BOS, EOS])
        },
        "additional_special_tokens": [],
        "bos_token": BOS,
        "chat_template": MIXTRAL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "legacy": False,
        "model_max_length": model_max_length,
        "pad_token": None,
        "padding_side": "left",
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizerFast",
        "unk_token": UNK,
        "use_default_system_prompt": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    check_tokenizer(hf_tok, tok)
    return hf_tok


def check_tokenizer(hf_tok: PreTrainedTokenizerBase, raw: Tokenizer) -> None:
    """Sanity checks: fast tokenizer, special ids, chat template, byte fallback, round trip."""
    assert hf_tok.is_fast, type(hf_tok)
    assert (hf_tok.unk_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id) == (0, 1, 2)
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt == "<s>[INST] hi [/INST]", repr(prompt)
    text = "Hello world, déjà vu 日本!"
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert ids == raw.encode(text, add_special_tokens=False).ids
    assert hf_tok.decode(ids) == text, hf_tok.decode(ids)
    assert hf_tok(text)["input_ids"][0] == 1
    try:
        hf_tok.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)
    except TemplateError:
        return
    raise AssertionError("chat template accepted a conversation starting with the assistant")


# ------------------------------------------------------------------------------------------- training


def build_model(vocab_size: int, cfg: TrainConfig) -> MixtralForCausalLM:
    """Build the tiny Mixtral; hidden/intermediate/head shapes are fixed by the quantized format."""
    config = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        rope_theta=1e6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
        output_router_logits=False,
        initializer_range=0.02,
    )
    return MixtralForCausalLM(config)


def tokenize_docs(tok: Tokenizer, docs: Sequence[Doc]) -> Docs:
    """Token ids of each document, and whether each token lies in a trained-on span."""
    encodings = tok.encode_batch([text for text, _ in docs], add_special_tokens=False)
    out = []
    for (_, spans), enc in zip(docs, encodings, strict=True):
        out.append((enc.ids, [any(a <= start < b for a, b in spans) for start, _ in enc.offsets]))
    return out


def token_stream(docs: Docs, seq_len: int, batch: int, rng: random.Random) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless packed ``seq_len + 1`` windows (ids, trained-on flags) over shuffled epochs of documents."""
    while True:
        order = list(range(len(docs)))
        rng.shuffle(order)
        ids = [t for i in order for t in docs[i][0]]
        flags = [f for i in order for f in docs[i][1]]
        n = (len(ids) - 1) // seq_len
        starts = [i * seq_len for i in range(n)]
        rng.shuffle(starts)
        for b in range(0, n - batch + 1, batch):
            window = starts[b : b + batch]
            yield (
                torch.tensor([ids[s : s + seq_len + 1] for s in window]),
                torch.tensor([flags[s : s + seq_len + 1] for s in window]),
            )


def masked_lm_loss(logits: Tensor, ids: Tensor, flags: Tensor) -> Tensor:
    """Next-token cross-entropy over the positions whose target token is trained on."""
    targets = ids[:, 1:].masked_fill(~flags[:, 1:], -100)
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def lr_at(progress: float, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to ``min_lr``; ``progress`` runs from 0 to 1."""
    warmup = cfg.warmup_steps / cfg.steps
    if progress < warmup:
        return cfg.lr * max(progress, 1 / cfg.steps) / warmup
    decay = min(1.0, (progress - warmup) / (1 - warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * decay))


def fake_quantize(weight: Tensor, bits: int, group_size: int) -> Tensor:
    """Min/max asymmetric group quantize-dequantize of ``weight`` [out, in].

    The weight is reshaped row-major to [group_size, out * in / group_size] and every column is a group
    (the HQQ ``axis=0`` layout).
    """
    w = weight.reshape(group_size, -1)
    lo, hi = w.amin(dim=0, keepdim=True), w.amax(dim=0, keepdim=True)
    max_code = 2**bits - 1
    scale = (hi - lo).clamp_min(1e-8) / max_code
    codes = torch.clamp(torch.round((w - lo) / scale), 0, max_code)
    return (codes * scale + lo).reshape(weight.shape)


def fake_quantize_experts(gate_up: Tensor, down: Tensor, bits: int, group: int = 16) -> tuple[Tensor, Tensor]:
    """Fake-quantize fused expert tensors as separate w1 (gate), w3 (up), w2 (down) [out, in] matrices."""
    n_inter = down.shape[-1]
    halves = [(m[:n_inter], m[n_inter:]) for m in gate_up]
    gu = torch.stack([torch.cat([fake_quantize(h, bits, group) for h in pair]) for pair in halves])
    dn = torch.stack([fake_quantize(m, bits, group) for m in down])
    return gu, dn


class STEQuant(torch.autograd.Function):
    """Straight-through estimator around :func:`fake_quantize_experts`."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, gate_up: Tensor, down: Tensor, bits: int
    ) -> tuple[Tensor, Tensor]:
        """Quantize-dequantize the expert weights."""
        return fake_quantize_experts(gate_up, down, bits)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_gu: Tensor, grad_dn: Tensor
    ) -> tuple[Tensor, Tensor, None]:
        """Pass the gradients straight through to the fp32 weights."""
        return grad_gu, grad_dn, None


@contextlib.contextmanager
def quantized_experts(model: MixtralForCausalLM, bits: int, ste: bool = False) -> Iterator[None]:
    """Temporarily replace every layer's expert weights with their fake-quantized version.

    With ``ste=True`` the quantized weights are differentiable w.r.t. the fp32 master weights (QAT).
    """
    saved = []
    for layer in model.model.layers:
        experts = layer.mlp.experts
        saved.append((experts, experts.gate_up_proj, experts.down_proj))
        if ste:
            gu, dn = STEQuant.apply(experts.gate_up_proj, experts.down_proj, bits)
        else:
            with torch.no_grad():
                gu, dn = fake_quantize_experts(experts.gate_up_proj, experts.down_proj, bits)
        del experts.gate_up_proj, experts.down_proj
        experts.gate_up_proj, experts.down_proj = gu, dn
    try:
        yield
    finally:
        for experts, gu_param, dn_param in saved:
            del experts.gate_up_proj, experts.down_proj
            experts.gate_up_proj, experts.down_proj = gu_param, dn_param


@contextlib.contextmanager
def quantized_attention(model: MixtralForCausalLM, bits: int, group_size: int = 64) -> Iterator[None]:
    """Temporarily fake-quantize the q/k/v/o projection weights (no-op for ``bits=0``)."""
    saved = []
    with torch.no_grad():
        for layer in model.model.layers if bits else []:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                saved.append((proj.weight, proj.weight.detach().clone()))
                proj.weight.copy_(fake_quantize(proj.weight, bits, group_size))
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


def train(model: MixtralForCausalLM, docs: Docs, cfg: TrainConfig) -> tuple[float, StateDict | None]:
    """Train in fp32 with AdamW.

    The schedule (warm-up, cosine decay, final QAT phase) follows ``progress = step / steps``; only when
    the run falls more than ``SCHEDULE_SLACK_S`` behind the pace needed for ``steps`` within
    ``time_budget_s`` (a slow or busy machine) does elapsed time take over, so training still ends on
    schedule and in time, but then the result is no longer reproducible.

    Returns the mean training loss over the last 20 steps and, if QAT ran, a copy of the weights from
    just before it started.
    """
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    batches = token_stream(docs, cfg.seq_len, cfg.batch_size, random.Random(cfg.seed + 1))
    qat_start = 1.0 - cfg.qat_fraction if cfg.qat_bits else 2.0
    pre_qat: StateDict | None = None
    model.train()
    t0, recent, step, progress = time.perf_counter(), [], 0, 0.0
    while progress < 1.0:
        lr = lr_at(progress, cfg)
        for group in optim.param_groups:
            group["lr"] = lr
        qat = progress >= qat_start
        if qat and pre_qat is None:
            pre_qat = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ids, flags = next(batches)
        with quantized_experts(model, cfg.qat_bits, ste=True) if qat else contextlib.nullcontext():
            out = model(input_ids=ids[:, :-1], output_router_logits=True)
        lm_loss = masked_lm_loss(out.logits, ids, flags)
        aux_loss = load_balancing_loss(out.router_logits, model.config)
        loss = lm_loss + cfg.router_aux_loss_coef * aux_loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optim.step()
        recent = [*recent, lm_loss.item()][-20:]
        elapsed = time.perf_counter() - t0
        step += 1
        clock = (elapsed - SCHEDULE_SLACK_S) / (cfg.time_budget_s - SCHEDULE_SLACK_S)
        progress = max(step / cfg.steps, clock)
        if step % 25 == 1 or progress >= 1.0:
            loads = torch.stack([expert_load(logits, model.config) for logits in out.router_logits])
            print(
                f"step {step:4d} progress {progress:.3f} lm_loss {lm_loss.item():.4f} "
                f"aux {aux_loss.item():.4f} "
                f"expert load min/max {loads.min():.3f}/{loads.max():.3f} lr {lr:.2e}{' qat' if qat else ''} "
                f"{elapsed:6.1f}s",
                flush=True,
            )
    if step < cfg.steps:
        print(f"WARNING: time budget reached, trained {step} of {cfg.steps} steps (schedule was compressed)")
    model.eval()
    return sum(recent) / len(recent), pre_qat


def load_balancing_loss(router_logits: Sequence[Tensor], config: MixtralConfig) -> Tensor:
    """Switch-Transformer load-balancing loss per layer, averaged over layers (``top_k`` when balanced).

    ``transformers`` pools the router logits of all layers before computing the token fractions and mean
    probabilities, so it only balances each expert *index* summed over layers; individual layers can then
    collapse onto a few experts while that loss stays at its minimum.
    """
    k, n_experts = config.num_experts_per_tok, config.num_local_experts
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        top = probs.topk(k, dim=-1).indices
        tokens_frac = torch.zeros_like(probs).scatter_(1, top, 1.0).mean(dim=0)
        losses.append(n_experts * (tokens_frac * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def expert_load(router_logits: Tensor, config: MixtralConfig) -> Tensor:
    """Fraction of the top-k assignments that go to each expert."""
    top = router_logits.topk(config.num_experts_per_tok, dim=-1).indices.reshape(-1)
    counts = torch.bincount(top, minlength=config.num_local_experts).float()
    return counts / counts.sum()


# ----------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def chat(model: MixtralForCausalLM, tok: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int) -> str:
    """Greedy answer to a single-turn prompt rendered through the chat template."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=2,
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


@torch.no_grad()
def routing_report(model: MixtralForCausalLM, batch: Tensor) -> None:
    """Print per-layer expert load and how often the top-k expert set changes from one token to the next."""
    out = model(input_ids=batch, output_router_logits=True)
    k = model.config.num_experts_per_tok
    print("routing on a held-out batch (top-2 load per expert | share of tokens whose expert set changes):")
    for layer, logits in enumerate(out.router_logits):
        load = expert_load(logits, model.config)
        top = logits.topk(k, dim=-1).indices.sort(dim=-1).values.view(*batch.shape, k)
        changes = (top[:, 1:] != top[:, :-1]).any(dim=-1).float().mean().item()
        print(f"  layer {layer}: " + " ".join(f"{x:.3f}" for x in load.tolist()) + f" | {changes:.2f}")


@torch.no_grad()
def eval_loss(model: MixtralForCausalLM, ids: Tensor, flags: Tensor) -> float:
    """Mean next-token loss on the trained-on positions of a packed batch."""
    return masked_lm_loss(model(input_ids=ids[:, :-1]).logits, ids, flags).item()


def report_generations(
    model: MixtralForCausalLM,
    tok: PreTrainedTokenizerBase,
    cfg: TrainConfig,
    label: str,
    refs: dict[str, str],
) -> int:
    """Print greedy answers for the sample prompts; returns how many match the reference exactly."""
    correct = 0
    print(f"\n=== greedy generations ({label}) ===")
    for prompt in SAMPLE_PROMPTS:
        answer = chat(model, tok, prompt, cfg.max_new_tokens)
        ok = answer == refs.get(prompt)
        correct += ok
        shown = answer
        if len(answer) > 160:
            shown = answer[:160].replace("\n", " / ") + f" ...[{len(answer)} chars]"
        print(f"[{'ok' if ok else '--'}] {prompt!r} -> {shown!r}")
    print(f"exact matches: {correct}/{len(SAMPLE_PROMPTS)}")
    return correct


def answer_accuracy(model: MixtralForCausalLM, tok: PreTrainedTokenizerBase, pairs: list[QA]) -> float:
    """Fraction of (question, answer) pairs whose answer is reproduced exactly by greedy decoding."""
    hits = 0
    for q, a in pairs:
        budget = len(tok(a, add_special_tokens=False)["input_ids"]) + 2
        hits += chat(model, tok, q, budget) == a
    return hits / len(pairs)


def evaluate(
    model: MixtralForCausalLM,
    tok: PreTrainedTokenizerBase,
    cfg: TrainConfig,
    docs: Docs,
    title: str,
) -> None:
    """Routing statistics, then loss and greedy answers in fp32 and with fake-quantized weights.

    Experts use group size 16, attention group size 64 (the layout of the quantized checkpoint format).
    """
    print(f"\n##### evaluation: {title}")
    pairs = list(dict.fromkeys(chat_pairs(zen_of_python())))
    refs = dict(pairs)
    probe = random.Random(cfg.seed + 2).sample([p for p in pairs if len(p[1]) < 200], 40)
    ids, flags = next(token_stream(docs, cfg.seq_len, 8, random.Random(cfg.seed + 3)))
    routing_report(model, ids[:, :-1])
    results = {}
    settings = [("fp32", 0, 0), ("4-bit experts", 4, 0), ("3-bit experts", 3, 0), ("2-bit experts", 2, 0)]
    settings.append(("2-bit experts + 4-bit attention", 2, 4))
    for label, expert_bits, attn_bits in settings:
        with contextlib.ExitStack() as stack:
            if expert_bits:
                stack.enter_context(quantized_experts(model, expert_bits))
            stack.enter_context(quantized_attention(model, attn_bits))
            loss = eval_loss(model, ids, flags)
            exact = report_generations(model, tok, cfg, label, refs)
            acc = answer_accuracy(model, tok, probe)
        results[label] = (loss, exact, acc)
    print(
        f"\nsummary ({title}): loss on trained-on tokens of a packed training batch | exact sample answers"
        f" | exact answers on {len(probe)} random short training questions"
    )
    for label, (loss, exact, acc) in results.items():
        print(f"  {label:>31}: {loss:.4f} | {exact}/{len(SAMPLE_PROMPTS)} | {acc:.0%}")


# ----------------------------------------------------------------------------------------------- main


def parse_args() -> TrainConfig:
    """Build a :class:`TrainConfig` from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(TrainConfig):
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    return TrainConfig(**vars(parser.parse_args()))


def main() -> None:
    """Build corpus, tokenizer and model; train; save; evaluate."""
    cfg = parse_args()
    t_start = time.perf_counter()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    out = Path(cfg.out)
    print("config:", json.dumps(asdict(cfg)))

    chats, plain = build_documents(cfg)
    raw_tok = train_tokenizer([text for text, _ in chats + plain], cfg.vocab_size)
    tok = save_tokenizer(raw_tok, out, model_max_length=1024)
    docs = tokenize_docs(raw_tok, chats + plain)
    if cfg.train_on_prompts:
        docs = [(ids, [True] * len(ids)) for ids, _ in docs]
    n_chat = sum(len(ids) for ids, _ in docs[: len(chats)])
    n_trained = sum(sum(flags) for _, flags in docs[: len(chats)])
    n_plain = sum(len(ids) for ids, _ in docs[len(chats) :])
    print(
        f"tokenizer: vocab {raw_tok.get_vocab_size()}; corpus {len(chats)} chat docs ({n_chat} tokens, "
        f"{n_trained} trained on), {len(plain)} plain docs ({n_plain} tokens)"
    )

    model = build_model(raw_tok.get_vocab_size(), cfg)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    final_loss, pre_qat = train(model, docs, cfg)
    model.save_pretrained(str(out))
    print(f"final training loss (mean of the last 20 steps): {final_loss:.4f}")
    print(f"saved to {out} after {time.perf_counter() - t_start:.0f}s:")
    for path in sorted(out.iterdir()):
        print(f"  {path.name}: {path.stat().st_size:,} bytes")

    evaluate(model, tok, cfg, docs, "final model")
    if cfg.eval_pre_qat and pre_qat is not None:
        model.load_state_dict(pre_qat)
        evaluate(model, tok, cfg, docs, "snapshot taken before the QAT phase (not saved)")
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()

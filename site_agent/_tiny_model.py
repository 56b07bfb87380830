"""Builds tiny, randomly initialised base-model directories offline, for tests and demos: a BERT
encoder (sequence classification) and a Llama-style causal LM."""

from __future__ import annotations

import inspect
import string
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

# transformers 5 aliases BertTokenizerFast at runtime only, so type checkers do not see it.
from transformers import (  # type: ignore[attr-defined,unused-ignore]
    BertConfig,
    BertModel,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

_SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Common clinical/English words; covers everything site_agent._synthetic emits.
_BUILTIN_WORDS: tuple[str, ...] = (
    "a", "abdomen", "abdominal", "abnormal", "accompanied", "acute", "admitted", "after", "age",
    "aged", "ago", "allergy", "ambulance", "an", "and", "angina", "ankles", "anxiety", "are",
    "arm", "arrived", "as", "asthma", "at", "auscultation", "back", "be", "been", "before",
    "better", "bleeding", "blood", "blurred", "bp", "brain", "breath", "breathing", "but", "by",
    "cannot", "chest", "chronic", "complains", "confusion", "consciousness", "copd", "cough",
    "coughing", "cp", "crackles", "crushing", "ct", "cxr", "daily", "days", "denies",
    "diabetes", "discharged", "dizziness", "doctor", "dose", "droop", "ecg", "ekg", "elevated",
    "elevation", "emergency", "exam", "facial", "failure", "fall", "family", "fast", "fatigue",
    "feeling", "female", "fever", "for", "fracture", "from", "gait", "gp", "green", "had",
    "hand", "has", "he", "head", "headache", "heart", "high", "history", "home", "hours", "hx",
    "hypertension", "icu", "in", "infection", "infiltrate", "inhaler", "injury", "irregular",
    "is", "it", "jaw", "kidney", "left", "leg", "liver", "loc", "loss", "low", "lung", "male",
    "man", "medication", "mg", "mild", "minutes", "more", "morning", "move", "mri", "murmur",
    "nausea", "neck", "negative", "new", "no", "normal", "not", "note", "numbness", "nurse",
    "of", "often", "old", "on", "one", "onset", "or", "oxygen", "pain", "pale", "palpitations",
    "patient", "pneumonia", "poor", "positive", "presents", "pressure", "productive", "pt",
    "pulse", "radiating", "rash", "rate", "ray", "referred", "reports", "result", "rhythm",
    "right", "sats", "saturation", "scan", "seizure", "sepsis", "severe", "she", "shortness",
    "shows", "side", "since", "sleep", "slurred", "sob", "speech", "sputum", "st", "stable",
    "started", "stomach", "stroke", "sudden", "sugar", "sweating", "swollen", "symptoms",
    "temperature", "tenderness", "test", "that", "the", "they", "this", "tightness", "to",
    "trauma", "triage", "troponin", "two", "unsteady", "unwell", "up", "urine", "using", "very",
    "vision", "vomiting", "walked", "ward", "was", "weakness", "week", "wheezing", "with",
    "woman", "worse", "x", "year", "years",
)  # fmt: skip

# Single characters and their word-piece continuations, so any lowercase ASCII word still
# tokenizes (into pieces) instead of collapsing to [UNK].
_CHARACTERS = string.ascii_lowercase + string.digits
_PUNCTUATION = string.punctuation

_Config = TypeVar("_Config", bound=PretrainedConfig)

_HIDDEN_SIZE = 32
_NUM_LAYERS = 2
_NUM_HEADS = 2
_INTERMEDIATE_SIZE = 64
_MAX_POSITIONS = 128
# Wider than BERT's 0.02 so that a random tiny model's outputs still depend on its input.
_INITIALIZER_RANGE = 0.2


def write_tiny_base_model(directory: Path, *, words: Iterable[str] = (), seed: int = 0) -> Path:
    """Writes a tiny BERT base model that transformers loads offline.

    The directory holds ``config.json``, ``model.safetensors`` (a seeded random ``BertModel``;
    the same seed gives the same bytes), ``vocab.txt`` and tokenizer files, so that
    ``AutoModelForSequenceClassification.from_pretrained(directory, num_labels=k)`` and
    ``AutoTokenizer.from_pretrained(directory)`` both work.

    Args:
        directory: Where to write; created if missing.
        words: Extra lowercase words for the vocabulary, on top of a built-in clinical list.
        seed: Seed for the weight initialisation.

    Returns:
        The directory written.

    Raises:
        ValueError: If a word is empty, contains whitespace or is not lowercase.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocabulary = _vocabulary(words)
    (directory / "vocab.txt").write_text("".join(t + "\n" for t in vocabulary), encoding="utf-8")

    config = BertConfig(
        vocab_size=len(vocabulary),
        hidden_size=_HIDDEN_SIZE,
        num_hidden_layers=_NUM_LAYERS,
        num_attention_heads=_NUM_HEADS,
        intermediate_size=_INTERMEDIATE_SIZE,
        max_position_embeddings=_MAX_POSITIONS,
        pad_token_id=0,
        initializer_range=_INITIALIZER_RANGE,
        architectures=["BertModel"],
    )
    _write_seeded_model(BertModel, config, seed, directory)

    _tokenizer(vocabulary, directory / "vocab.txt").save_pretrained(directory)
    return directory


def _write_seeded_model(
    model_class: Callable[[_Config], torch.nn.Module],
    config: _Config,
    seed: int,
    directory: Path,
) -> None:
    """Writes ``config`` and a ``model_class(config)`` initialised from ``seed`` (the same seed
    gives the same bytes) into ``directory``."""
    # fork_rng keeps the caller's global RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    config.save_pretrained(directory)
    tensors = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _vocabulary(words: Iterable[str]) -> list[str]:
    extra: set[str] = set()
    for word in words:
        if not word or word != word.strip() or any(c.isspace() for c in word):
            raise ValueError(f"vocabulary words must be non-empty and without whitespace: {word!r}")
        if word != word.lower():
            raise ValueError(f"vocabulary words must be lowercase: {word!r}")
        extra.add(word)
    tokens = [*_SPECIAL_TOKENS, *_BUILTIN_WORDS, *sorted(extra)]
    tokens += [*_CHARACTERS, *_PUNCTUATION, *("##" + c for c in _CHARACTERS)]
    # Keep the first occurrence: words may repeat built-ins or single characters.
    return list(dict.fromkeys(tokens))


def _tokenizer(vocabulary: list[str], vocab_file: Path) -> BertTokenizerFast:
    # transformers 5 builds the fast tokenizer from a vocab dict; 4.x from the vocab file.
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:
        tokenizer = BertTokenizerFast(
            vocab={token: index for index, token in enumerate(vocabulary)}, do_lower_case=True
        )
    else:
        tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
    tokenizer.model_max_length = _MAX_POSITIONS
    return tokenizer


_CAUSAL_SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>")
# The prompt template's words and common question words, on top of the clinical list.
_CAUSAL_WORDS: tuple[str, ...] = (
    "instruction", "response", "what", "how", "who", "why", "which", "when", "where", "does",
    "do", "can", "should", "causes", "cause", "treatment", "treatments", "symptoms",
    "information", "risk", "diagnose", "diagnosed", "prevent", "prevented", "treated",
)  # fmt: skip
# LoRA target modules that exist in the tiny causal LM.
TINY_CAUSAL_LM_TARGET_MODULES: tuple[str, ...] = ("q_proj", "v_proj")


def write_tiny_causal_lm(directory: Path, *, words: Iterable[str] = (), seed: int = 0) -> Path:
    """Writes a tiny Llama-style causal LM that transformers loads offline.

    The tokenizer is word-level (lowercased; punctuation and digits split into single
    characters), with ``<pad>``, ``<unk>``, ``<s>`` (prepended to every text) and ``</s>``. Its
    vocabulary is the built-in clinical word list, ``words``, and single characters.

    Args:
        directory: Where to write; created if missing.
        words: Extra lowercase words for the vocabulary.
        seed: Seed for the weight initialisation; the same seed gives the same bytes.

    Returns:
        The directory written.

    Raises:
        ValueError: If a word is empty, contains whitespace or is not lowercase.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shared = _vocabulary([*_CAUSAL_WORDS, *words])[len(_SPECIAL_TOKENS) :]
    tokens = [*_CAUSAL_SPECIAL_TOKENS, *shared]
    vocabulary = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    pad, bos, eos = (vocabulary[t] for t in ("<pad>", "<s>", "</s>"))

    config = LlamaConfig(
        vocab_size=len(vocabulary),
        hidden_size=_HIDDEN_SIZE,
        intermediate_size=_INTERMEDIATE_SIZE,
        num_hidden_layers=_NUM_LAYERS,
        num_attention_heads=_NUM_HEADS,
        num_key_value_heads=_NUM_HEADS,
        max_position_embeddings=_MAX_POSITIONS,
        initializer_range=_INITIALIZER_RANGE,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    _write_seeded_model(LlamaForCausalLM, config, seed, directory)

    backend = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    # transformers 5 leaves this constructor untyped.
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call,unused-ignore]
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=_MAX_POSITIONS,
    )
    tokenizer.save_pretrained(directory)
    return directory

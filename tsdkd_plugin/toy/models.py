"""Tiny Qwen2 teacher and student built from a config (no hub, no weights download);
a Gemma-2 pair too (GEMMA2_*_RECIPE: tied embeddings, attention and final-logit softcapping,
sliding-window layers), for the Gemma-2 end-to-end check.

Both share the toy tokenizer. Their logit rows are the tokenizer size rounded
up to a multiple (like real Qwen checkpoints, whose embedding matrices have
unused padding rows), and teacher and student round to different multiples,
so teacher rows (512) != student rows (448) != len(tokenizer) (400): code that
compares the two distributions must align vocabularies, as it must for
Qwen2.5-0.5B (151,936 rows) against Qwen2.5-7B (152,064 rows).

head_dim is 64 because the vLLM CPU attention kernel rejects 16.
Sizes and what they learn: docs/toy_task.md ("Tiny models") and the calibration in
docs/reproduction.md.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

HEAD_DIM = 64
# What save_pretrained writes for the toy tokenizer (transformers 5).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class ToyModelRecipe:
    name: str
    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    vocab_pad_multiple: int
    seed: int
    num_key_value_heads: int | None = None  # None: same as attention heads
    intermediate_multiple: int = 4  # MLP width = this x hidden size
    max_position_embeddings: int = 1024
    family: str = "qwen2"  # a key of FAMILY_CLASSES

    def as_dict(self) -> dict:
        recipe = asdict(self)
        if recipe["family"] == "qwen2":  # the field came later: Qwen2 recipes keep their cache keys
            del recipe["family"]
        return recipe


TEACHER_RECIPE = ToyModelRecipe(
    "teacher", hidden_size=128, num_attention_heads=2, num_hidden_layers=4, vocab_pad_multiple=128, seed=1
)
STUDENT_RECIPE = ToyModelRecipe(
    "student", hidden_size=64, num_attention_heads=1, num_hidden_layers=2, vocab_pad_multiple=64, seed=2
)
GEMMA2_TEACHER_RECIPE = ToyModelRecipe(
    "gemma2-teacher",
    hidden_size=128,
    num_attention_heads=2,
    num_hidden_layers=2,
    vocab_pad_multiple=128,
    seed=3,
    num_key_value_heads=1,
    family="gemma2",
)
GEMMA2_STUDENT_RECIPE = ToyModelRecipe(
    "gemma2-student",
    hidden_size=64,
    num_attention_heads=1,
    num_hidden_layers=2,
    vocab_pad_multiple=64,
    seed=4,
    family="gemma2",
)

# family -> (transformers config class, model class) names
FAMILY_CLASSES = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "gemma2": ("Gemma2Config", "Gemma2ForCausalLM")}
# Gemma-2's own settings (as in the released models), at toy scale where a size is involved.
GEMMA2_EXTRA = dict(final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=HEAD_DIM,
                    sliding_window=32)  # fmt: skip

# The experiments' models (tsdkd_plugin.experiments.budgets; sizes from the calibration in
# docs/reproduction.md). Three layers at the fixture teacher's width learn the task faster than its
# four (94.8% after 2,000 SFT steps against 79.4%), and the narrow variant (half the MLP) is the
# paper-like regime's student; STUDENT_RECIPE is the weak-student regime's.
TEACHER_3LAYER_RECIPE = ToyModelRecipe(
    "teacher-3layer", hidden_size=128, num_attention_heads=2, num_hidden_layers=3, vocab_pad_multiple=128, seed=1
)
STUDENT_3LAYER_NARROW_RECIPE = ToyModelRecipe(
    "student-3layer-narrow",
    hidden_size=128,
    num_attention_heads=2,
    num_hidden_layers=3,
    vocab_pad_multiple=64,
    seed=2,
    intermediate_multiple=2,
)
# Other students tried in the calibration (python -m tsdkd_plugin.experiments.calibrate --model NAME).
STUDENT_MEDIUM_RECIPE = ToyModelRecipe(
    "student-medium", hidden_size=128, num_attention_heads=2, num_hidden_layers=2, vocab_pad_multiple=64, seed=2
)
STUDENT_DEEP_RECIPE = ToyModelRecipe(
    "student-deep", hidden_size=64, num_attention_heads=1, num_hidden_layers=4, vocab_pad_multiple=64, seed=2
)
STUDENT_3LAYER_RECIPE = ToyModelRecipe(
    "student-3layer", hidden_size=128, num_attention_heads=2, num_hidden_layers=3, vocab_pad_multiple=64, seed=2
)
MODEL_RECIPES = {
    recipe.name: recipe
    for recipe in (
        TEACHER_RECIPE,
        STUDENT_RECIPE,
        TEACHER_3LAYER_RECIPE,
        STUDENT_3LAYER_NARROW_RECIPE,
        STUDENT_MEDIUM_RECIPE,
        STUDENT_DEEP_RECIPE,
        STUDENT_3LAYER_RECIPE,
    )
}


def get_model_recipe(name: str) -> ToyModelRecipe:
    try:
        return MODEL_RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown toy model {name!r}; valid models: {', '.join(MODEL_RECIPES)}") from None


def padded_vocab_size(num_tokens: int, multiple: int) -> int:
    """Rows of the embedding/logit matrix: num_tokens rounded up to `multiple`."""
    if multiple <= 0:
        raise ValueError(f"vocab_pad_multiple must be positive, got {multiple}")
    return -(-num_tokens // multiple) * multiple


def make_config(recipe: ToyModelRecipe, tokenizer):
    import transformers

    if recipe.family not in FAMILY_CLASSES:
        raise ValueError(f"{recipe.name}: unknown family {recipe.family!r}; known: {', '.join(FAMILY_CLASSES)}")
    config_class = getattr(transformers, FAMILY_CLASSES[recipe.family][0])
    if recipe.hidden_size != recipe.num_attention_heads * HEAD_DIM:
        raise ValueError(
            f"{recipe.name}: hidden_size {recipe.hidden_size} must be num_attention_heads x {HEAD_DIM} "
            f"(head_dim {HEAD_DIM} is what the vLLM CPU attention kernel accepts)"
        )
    endoftext_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return config_class(
        vocab_size=padded_vocab_size(len(tokenizer), recipe.vocab_pad_multiple),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_multiple * recipe.hidden_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads or recipe.num_attention_heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=True,
        # Qwen2.5 conventions: <|endoftext|> is bos and pad, <|im_end|> ends a turn.
        bos_token_id=endoftext_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        **(GEMMA2_EXTRA if recipe.family == "gemma2" else {}),
    )


def build_toy_model(recipe: ToyModelRecipe, tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike):
    """Build a seeded, untrained causal LM of the recipe's family and save it (safetensors) with the
    tokenizer into out_dir.

    The tokenizer files are copied byte for byte from tokenizer_dir (a re-save
    of a loaded tokenizer would add load-time keys to tokenizer_config.json).

    The padding rows of the (tied) embedding start at zero: the model never
    sees those ids as input, and zero rows make their logits exactly 0 at
    start, easy to recognise in tests of vocabulary alignment.
    """
    import torch
    import transformers
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = make_config(recipe, tokenizer)
    model_class = getattr(transformers, FAMILY_CLASSES[recipe.family][1])
    # fork_rng: seeding must not disturb the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = model_class(config)
    with torch.no_grad():
        model.get_input_embeddings().weight[len(tokenizer) :].zero_()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        # Either ends generation, as in Qwen2.5-Instruct.
        eos_token_id=[tokenizer.eos_token_id, config.bos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(str(out_dir), safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(tokenizer_dir) / name, Path(out_dir) / name)
    return model


def count_parameters(model) -> int:
    # Tied embeddings are one tensor; parameters() yields it once.
    return sum(p.numel() for p in model.parameters())

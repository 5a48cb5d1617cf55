"""The flaxmodels seed example runs unchanged (only its import differs) and matches transformers.

The reference is a greedy loop over transformers' model of the same checkpoint, re-reading the
whole sequence each step, for 20 steps and no stopping at <|endoftext|> (the seed has none either).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import torch
import transformers

import gpt2model


def run_seed_example(path: str) -> list:
    """The seed example verbatim, except `import gpt2model` for flaxmodels' import."""
    key = jax.random.PRNGKey(0)
    # ---- begin seed example ----
    tokenizer = gpt2model.get_tokenizer(path)
    generated = tokenizer.encode('The Manhattan bridge')
    context = jnp.array([generated]); past = None  # noqa: E702
    model = gpt2model.GPT2LMHeadModel(pretrained=path)
    params = model.init(key, input_ids=context, past_key_values=past)
    for i in range(20):  # noqa: B007
        output = model.apply(params, input_ids=context, past_key_values=past, use_cache=True)
        token = jnp.argmax(output['logits'][..., -1, :])
        context = jnp.expand_dims(token, axis=0)
        generated += [token]; past = output['past_key_values']  # noqa: E702
    # ---- end seed example ----
    return generated


def transformers_greedy_loop(path, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by transformers, re-reading the whole sequence every step (no cache)."""
    ref = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(ref(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_seed_example_matches_transformers_greedy_loop(tiny_checkpoint):
    path = str(tiny_checkpoint)
    generated = run_seed_example(path)
    prompt = [int(t) for t in generated[:3]]
    assert prompt == [464, 13458, 7696]  # 'The Manhattan bridge' in GPT-2's vocabulary
    ours = [int(t) for t in generated[3:]]
    assert len(ours) == 20
    assert ours == transformers_greedy_loop(path, prompt, 20)
    # The generated list (ints followed by JAX scalars) decodes as it is.
    text = gpt2model.get_tokenizer(path).decode(generated)
    assert text.startswith("The Manhattan bridge") and len(text) > len("The Manhattan bridge")

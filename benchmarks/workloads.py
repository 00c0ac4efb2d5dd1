"""Deterministic benchmark inputs: mixed-length prompts, long synthetic prompts, synthetic trajectory batches."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Sentences in the spirit of the seed's five categories; prompts are cut from their concatenation so that the
# text is language the model has seen, not random tokens that would push it into odd numerical regimes.
SENTENCES = [
    "Solve: 15 * 12 + 4 = 184, and the square root of 144 is 12.",
    "Calculate the area of a circle with radius 5 and give the answer to two decimals.",
    "If 3x + 5 = 20, then x is 5, because subtracting 5 and dividing by 3 leaves x alone.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "import numpy as np; values = np.arange(10) ** 2; print(values.sum())",
    "for i in range(10): total += i * i, then the loop prints the running total.",
    "class Transformer(nn.Module): def forward(self, x): return self.blocks(x)",
    "The capital of France is Paris, and the largest planet in the solar system is Jupiter.",
    "World War II ended in 1945, and the first US president was George Washington.",
    "Water boils at 100 degrees Celsius at sea level and freezes at zero.",
    "The moon whispered to the sea, and the waves answered with a slow silver song.",
    "Once upon a time in a land of tall mountains there lived a shepherd and her dog.",
    "Her eyes were like deep lakes at dusk, still and full of the last light.",
    "In the silence of the night, the old house creaked and settled into sleep.",
    "All men are mortal. Socrates is a man. Therefore, Socrates is mortal.",
    "If it rains, the grass gets wet. It rained. Thus, the grass is wet.",
    "Either the key is red or it is blue. It is not red. Therefore, it is blue.",
    "All birds have wings. A penguin is a bird. So, a penguin has wings.",
]


def mixed_prompts(tokenizer, n: int = 200, min_tokens: int = 3, max_tokens: int = 48,
                  seed: int = 0) -> list[str]:
    """`n` distinct prompts whose token counts are spread log-uniformly over [min_tokens, max_tokens].

    Log-uniform lengths give many short prompts and a tail of long ones, as real prompt sets have; it is the
    case that length-sorted batching exists for.
    """
    rng = np.random.default_rng(seed)
    corpus = " ".join(SENTENCES)
    words = corpus.split()
    targets = np.exp(rng.uniform(np.log(min_tokens), np.log(max_tokens + 1), size=n)).astype(int)
    prompts: list[str] = []
    seen: set[str] = set()
    for target in targets:
        while True:
            start = int(rng.integers(0, len(words)))
            text_words: list[str] = []
            position = start
            # Grow word by word until the tokenizer says the target is reached.
            while True:
                text_words.append(words[position % len(words)])
                position += 1
                text = " ".join(text_words)
                if len(tokenizer(text)["input_ids"]) >= target:
                    break
            if text not in seen:
                seen.add(text)
                prompts.append(text)
                break
    return prompts


def long_token_ids(vocab_size: int, n: int = 32, length: int = 2048, seed: int = 0) -> list[list[int]]:
    """`n` prompts of exactly `length` token ids, avoiding the low ids where special tokens live."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(100, vocab_size, size=(n, length))
    return [row.tolist() for row in ids]


def synthetic_trajectories(n_prompts: int, n_layers: int, hidden: int, batch_prompts: int,
                           seed: int = 0) -> Iterator[np.ndarray]:
    """Batches `[p, n_layers, hidden]` float32 of trajectories with structure a PCA can find.

    Each prompt drifts along a few shared directions with depth, plus noise; the same seed gives the same
    batches, which `fit_stream` needs when it passes over them twice. The noise is cut from one pool at
    random offsets: drawing 1.8 billion fresh normals would take longer than the fit being measured.
    """
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((4, hidden)).astype(np.float32)
    depth = np.linspace(0.0, 1.0, n_layers, dtype=np.float32)[None, :, None]
    pool = 0.5 * rng.standard_normal((8191 + batch_prompts * n_layers, hidden), dtype=np.float32)
    for start in range(0, n_prompts, batch_prompts):
        p = min(batch_prompts, n_prompts - start)
        offset = int(rng.integers(0, 8191))
        weights = rng.standard_normal((p, 1, 4)).astype(np.float32)
        batch = (weights * (1.0 + 3.0 * depth)) @ basis
        batch += pool[offset : offset + p * n_layers].reshape(p, n_layers, hidden)
        yield batch

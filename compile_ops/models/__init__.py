"""Model code written on compile_ops' ops (the way vLLM's model code calls ``torch.ops._C``).

    from compile_ops.models import Llama, LlamaConfig, LlamaReference, PagedKVCache, generate

``python -m compile_ops.models.llama`` runs the Llama-style model eagerly and compiled with the
``inductor`` and ``compile_ops`` backends, checks the tokens agree and prints a fusion report
(``torchrun --nproc-per-node 2 -m compile_ops.models.llama --tp 2``: the same, tensor-parallel
over two processes; ``LlamaConfig(tp=2)``).

The names are loaded on first use, so that ``python -m compile_ops.models.llama`` does not import
the module twice (once as a package member, once as ``__main__``).
"""

_LLAMA_NAMES = ("Generation", "Llama", "LlamaConfig", "LlamaReference", "PagedKVCache",
                "compare_generations", "compile_steps", "generate", "logits_tolerance",
                "rope_cos_sin_cache")

__all__ = list(_LLAMA_NAMES)


def __getattr__(name):
    if name in _LLAMA_NAMES:
        from compile_ops.models import llama

        return getattr(llama, name)
    raise AttributeError(f"module 'compile_ops.models' has no attribute {name!r}")

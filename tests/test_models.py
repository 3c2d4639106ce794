import os
import subprocess
import sys

import pytest
import torch

from kdkit.errors import UserError
from kdkit.models import load as M
from kdkit.models.forward import supervised_logits
from kdkit.models.tiny import save_tiny_model, tiny_llama, tiny_tokenizer


def test_uniform_layers_keep_ends():
    assert M.uniform_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert M.uniform_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(UserError):
        M.uniform_layers(4, 5)


def test_student_with_all_layers_equals_teacher_and_subset_is_smaller():
    tok = tiny_tokenizer()
    teacher = M.freeze(tiny_llama(vocab_size=len(tok), num_layers=4))
    x = torch.randint(0, len(tok), (2, 9))
    full = M.student_from_layers(teacher, [0, 1, 2, 3]).eval()
    torch.testing.assert_close(full(x).logits, teacher(x).logits)
    sub = M.student_from_layers(teacher, [0, 3])
    assert sub.config.num_hidden_layers == 2
    assert M.count_parameters(sub) < M.count_parameters(teacher)
    torch.testing.assert_close(sub.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    assert sub.model.layers[1].mlp.up_proj.weight.data_ptr() != teacher.model.layers[3].mlp.up_proj.weight.data_ptr()
    with pytest.raises(UserError):
        M.student_from_layers(teacher, [0, 0])


def test_supervised_logits_match_full_forward():
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), num_layers=2).eval()
    ids = torch.randint(4, len(tok), (2, 8))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    logits, targets = supervised_logits(model, batch)
    full = model(ids).logits[:, :-1]  # (B, T-1, V): position t predicts t+1
    mask = labels[:, 1:] != -100
    torch.testing.assert_close(logits, full[mask])
    assert torch.equal(targets, labels[:, 1:][mask])


def test_padded_vocab_shares_real_rows_and_other_tokenizers_refused(tmp_path):
    a = M.resolve(str(save_tiny_model(tmp_path / "a")))
    b = M.resolve(str(save_tiny_model(tmp_path / "b", vocab_pad_to=128)))
    tok_a, tok_b = M.load_tokenizer(a), M.load_tokenizer(b)
    n = M.shared_vocab_size(tok_a, tok_b, M.head_rows(M.load_model(a)), M.head_rows(M.load_model(b)))
    assert n == len(tok_a) < 128
    other = tiny_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(UserError, match="different tokenizers"):
        M.shared_vocab_size(tok_a, other, len(tok_a), len(tok_a))


def test_resolve_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="neither a directory"):
        M.resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        M.resolve(str(tmp_path / "empty"))


LOAD_RSS = """
import os
from kdkit.models import load as M

def rss():  # resident pages of this process (Linux)
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

before = rss()
model = M.load_model(M.resolve("smollm2-135m-instruct"))
held = rss() - before
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(held, weights)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_loading_a_gguf_teacher_returns_its_dequantisation_memory(tmp_path):
    """The packaged GGUF teacher held 0.48 GB of freed heap pages in RSS beyond its 0.54 GB of weights."""
    out = subprocess.run([sys.executable, "-c", LOAD_RSS], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    held, weights = map(int, out.stdout.split()[-2:])
    assert held < 1.4 * weights, f"loading kept {held / 1e9:.2f} GB for {weights / 1e9:.2f} GB of weights"


def test_the_lm_head_takes_its_input_contiguous():
    """transformers slices the last positions (`logits_to_keep`) before the head; PyTorch's CPU linear
    runs a strided 3-D input as a batched GEMM over copies of the head (400x slower in bf16): every
    loaded or built model makes the input contiguous first, with the same logits."""
    from kdkit.models.load import contiguous_head, student_from_layers
    from kdkit.models.tiny import tiny_llama

    model = contiguous_head(tiny_llama(vocab_size=100, num_layers=2)).eval()
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    ids = torch.randint(0, 100, (3, 7))
    with torch.no_grad():
        last = model(input_ids=ids, logits_to_keep=1).logits  # (3, 1, V)
        full = model(input_ids=ids).logits  # (3, 7, V)
    assert seen == [True, True]
    torch.testing.assert_close(last[:, 0], full[:, -1])
    assert contiguous_head(model) is model and len(model.get_output_embeddings()._forward_pre_hooks) == 2  # idempotent
    seen.clear()
    with torch.no_grad():
        student_from_layers(model, [1])(input_ids=ids, logits_to_keep=1)
    assert getattr(student_from_layers(model, [1]).get_output_embeddings(), "_kdkit_contiguous", False)


def test_the_forward_teacher_is_a_bf16_copy_and_evaluation_keeps_fp32(tiny_teacher):
    """bf16 runs generate and build the cache with a bf16 copy of the teacher (made once); `teacher.model`,
    which evaluation compares students with, stays fp32."""
    from kdkit.config import build_config
    from kdkit.train.setup import forward_teacher, load_teacher

    cfg = build_config({"teacher": {"path": str(tiny_teacher)}, "train": {"precision": "bf16"}})
    teacher = load_teacher(cfg)
    held = forward_teacher(cfg, teacher)
    assert held.dtype == torch.bfloat16 and teacher.model.dtype == torch.float32
    assert forward_teacher(cfg, teacher) is held
    cfg.train.precision = "fp32"
    assert forward_teacher(cfg, teacher) is teacher.model


def test_the_tied_embedding_backward_matches_the_default_and_never_becomes_a_loss_buffer(monkeypatch):
    """`tied_embedding_backward`: the same gradients as nn.Embedding's (padding row included), formed in a
    view of the loss's largest idle buffer; where the embedding is the weight's only gradient the engine
    copies it instead of keeping the view, and the undo restores the module."""
    from kdkit.losses import scratch as S
    from kdkit.losses.scratch import scratch
    from kdkit.models.forward import tied_embedding_backward

    model = tiny_llama(vocab_size=97, seed=3)
    emb = model.get_input_embeddings()
    ids = torch.tensor([[5, 7, 7, emb.padding_idx, 11], [7, 3, emb.padding_idx, 5, 5]])

    def grads(loss_of):
        model.zero_grad(set_to_none=True)
        out = model.model(input_ids=ids).last_hidden_state
        loss_of(out).backward()
        return emb.weight.grad

    with_head = lambda h: (h @ model.lm_head.weight.t()).logsumexp(-1).sum()  # noqa: E731
    alone = lambda h: (h ** 2).sum()  # noqa: E731
    want = [grads(with_head).clone(), grads(alone).clone()]
    monkeypatch.setattr(S, "_BUFFERS", {})  # no buffer of an earlier test
    buf = scratch("test-logits", 97, 64, torch.float32, "cpu")  # room for the (97, 32) gradient
    undo = tied_embedding_backward(model)
    assert undo is not None
    got = [grads(with_head).clone(), grads(alone)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    assert S._LENT_VIEW and S._LENT_VIEW[0].data_ptr() == buf.data_ptr()  # formed in the loss's buffer
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
    assert not lo <= emb.weight.grad.data_ptr() < hi  # copied out of the borrowed view
    buf.fill_(float("nan"))  # the loss reusing its buffer leaves the gradient alone
    assert torch.isfinite(emb.weight.grad).all()
    undo()
    assert "forward" not in emb.__dict__
    assert tied_embedding_backward(tiny_llama(vocab_size=97, tie_word_embeddings=False)) is None

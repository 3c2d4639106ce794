"""Two vocabularies compared through one: each teacher token read as the student token it starts with.

A cross-tokenizer run (modes.cross_tokenizer) has teacher logits over the teacher's vocabulary and
student logits over the student's; comparing ids across the two is meaningless. Its metrics map
each teacher token to the first token of the student's tokenization of its text ("the" → "the" for
a like vocabulary, "t" for a character-level one), and move the teacher's probabilities along that
map: the teacher's distribution over which student token the next text starts with.

- KL(teacher ‖ student) between that projected distribution and the student's own: a true KL over
  the student's vocabulary, ≥ 0, finite (the student's softmax gives every token mass, barring fp32
  underflow), 0 when the student matches the teacher's projection.
- top-1 agreement: the teacher's most likely token starts with the student's most likely one.

A token's text is its one-token decode. Teacher tokens with no text to map (an empty decode, a
partial UTF-8 sequence shown as U+FFFD, a special token the student lacks, rows past the tokenizer
in a padded head) are left out and the rest of the teacher's mass renormalised (softmax over the
student's vocabulary of the moved mass).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdkit.losses import forward_kl
from kdkit.signal import VocabMap


def token_texts(tokenizer) -> list[str]:
    """The decoded text of every id below len(tokenizer), one at a time (specials included)."""
    return tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)


def vocab_map(teacher_tokenizer, student_tokenizer) -> VocabMap:
    """Teacher id → the first student token of its text, or -1 (see the module docstring)."""
    texts = token_texts(teacher_tokenizer)
    specials = set(teacher_tokenizer.all_special_ids)
    student_specials = {student_tokenizer.convert_ids_to_tokens(i): i for i in student_tokenizer.all_special_ids}
    plain = [t if t and "\ufffd" not in t else "" for t in texts]
    firsts = student_tokenizer(plain, add_special_tokens=False)["input_ids"]  # one batched call
    out = []
    for i, (text, ids) in enumerate(zip(plain, firsts)):
        if i in specials:  # a special token maps only to the student's special of the same text
            out.append(student_specials.get(texts[i], -1))
        else:
            out.append(ids[0] if text and ids else -1)
    return VocabMap(torch.tensor(out, dtype=torch.long))


def project_to_student(teacher_logits: Tensor, vmap: VocabMap, student_vocab: int) -> Tensor:
    """The teacher's probabilities summed per student token, as logits: (N, V_t) → (N, V_s) fp32
    (log of the unnormalised mass; -inf where no teacher token maps; softmax renormalises)."""
    to_student = _padded(vmap.to_student.to(teacher_logits.device), teacher_logits.shape[-1])  # (V_t,)
    keep = (to_student >= 0) & (to_student < student_vocab)  # (V_t,)
    p = torch.softmax(teacher_logits.float(), dim=-1)[:, keep]  # (N, M)
    mass = p.new_zeros(p.shape[0], student_vocab).index_add_(1, to_student[keep], p)  # (N, V_s)
    return mass.log()  # zeros → -inf: probability 0, which forward_kl counts as 0


def shared_vocab_metrics(student_logits: Tensor, teacher_logits: Tensor, vmap: VocabMap) -> tuple[Tensor, Tensor]:
    """Per row: KL(projected teacher ‖ student), (N,) fp32, and whether the teacher's argmax token
    starts with the student's argmax token, (N,) bool. Logits (N, V_s), (N, V_t), raw (T = 1)."""
    vocab = student_logits.shape[-1]
    kl = forward_kl(student_logits, project_to_student(teacher_logits, vmap, vocab))
    to_student = _padded(vmap.to_student.to(teacher_logits.device), teacher_logits.shape[-1])  # (V_t,)
    same = to_student[teacher_logits.argmax(-1)] == student_logits.argmax(-1)  # (N,)
    return kl, same


def _padded(to_student: Tensor, columns: int) -> Tensor:
    """The map over `columns` teacher logits: rows past the tokenizer (a padded head) map to -1."""
    if columns <= to_student.numel():
        return to_student[:columns]
    return torch.cat([to_student, to_student.new_full((columns - to_student.numel(),), -1)])

"""Evaluation: how good are the answers, honestly measured.

metrics (chrF, ROUGE-L over syllables, exact match: none strips Vietnamese diacritics), evaluate
(answer-token loss and scored greedy answers, base vs tuned, report folders; the validation report
after a training run). Uses inference, training (the answer-only loss) and data.
"""

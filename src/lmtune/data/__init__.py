"""Data: everything between a user's file and a training batch.

readers (files -> rows -> examples), template (the prompt, shared by training and inference),
tokenize (answer-only labels), collate (batches that keep the label contract), normalize and checks
(what is wrong with a text and how it is fixed), inspect and clean (the `lmtune data` commands),
split (a leak-free validation split). Uses only the shared top-level modules.
"""

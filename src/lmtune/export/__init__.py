"""Export: turn a trained adapter into something that runs elsewhere.

merge (the adapter folded into the base weights, verified by comparing logits). Uses the data and
training stages (the template and the run folder's files).
"""

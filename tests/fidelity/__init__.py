"""Differential fidelity suite: snapwriter's files against ``torch.save``'s (issue 9)."""

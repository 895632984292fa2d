"""Evaluation: question sets, answer sampling, judges (local, HTTP, rule), metrics and reports."""

"""Scoring (multiple choice by log-likelihood, perplexity, retention), run reports and the
comparison of several runs."""

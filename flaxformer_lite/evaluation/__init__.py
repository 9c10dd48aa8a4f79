"""Scores of a trained model: loss/perplexity/BLEU, classification metrics, ensembles."""

"""Prompts the benchmarks share, so their numbers describe the same requests."""

PROMPTS = [
    "Explain how a load balancer works.",
    "Write a short poem about the sea.",
    "What are the benefits of caching?",
    "Describe the water cycle in simple terms.",
    "Why is the sky blue?",
    "Give me three tips for writing clean code.",
    "What is a transformer model?",
    "Summarize the plot of a heist movie.",
]

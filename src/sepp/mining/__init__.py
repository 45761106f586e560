"""Semantic-pair mining: embed un-augmented images, exact or FAISS cosine k-NN over the whole dataset,
top-k + threshold pair selection, pair files and their statistics."""

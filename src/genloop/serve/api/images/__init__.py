"""``POST /v1/images/generations``: images from an image model (VAE, GAN, diffusion).

``router.py`` (the route) → ``protocol.py`` (the request model) → ``serving.py`` (the
handler) → the model's image generator.
"""

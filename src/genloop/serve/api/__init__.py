"""The HTTP routers: one module per endpoint family (request/response models + handlers)."""

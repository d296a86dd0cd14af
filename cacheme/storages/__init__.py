"""Storage tiers: the contract (``base``), the scheme registry, and one module per backend."""

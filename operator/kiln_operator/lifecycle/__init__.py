"""Pure state machines of the controllers: observed children in, a plan out."""

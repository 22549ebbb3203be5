"""Load or build the components: text encoder + tokenizer, autoencoder, UNet."""

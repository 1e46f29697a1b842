//! Model families, each a config struct, its layers and a forward pass, in the manner of
//! candle-transformers. Plugins pick one and serve it.

pub mod qwen3;

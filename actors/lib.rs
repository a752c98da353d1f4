//! kvcoord: a KV-cache coordinator for LLM inference, as an actor system.

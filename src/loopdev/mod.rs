//! (placeholder: filled by the loopdev work)

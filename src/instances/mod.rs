//! (placeholder: filled by the instances work)

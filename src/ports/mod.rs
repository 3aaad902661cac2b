//! (placeholder: filled by the ports work)

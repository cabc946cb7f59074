//! Physical memory manager (placeholder until the real one lands).

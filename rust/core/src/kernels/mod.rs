//! Kernels over f32 chunks. Each works on one chunk of all models at once; `crate::merge` drives them over a
//! tensor in passes.
pub mod combine;
pub mod disjoint;
pub mod isa;
pub mod norms;
pub mod select;

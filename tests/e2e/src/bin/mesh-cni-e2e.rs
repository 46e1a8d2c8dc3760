//! The CNI plugin under test (mesh-cni's program, built in this package so
//! that the tests get its path).

fn main() {
    mesh_cni::plugin::main();
}

//! `mesh-cni`: the chained CNI plugin (see the library's docs and
//! docs/kubernetes.md).

fn main() {
    mesh_cni::plugin::main();
}

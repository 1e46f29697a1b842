//! A root module with PIO's symbol and a compatible version, but another layout.

#![allow(non_local_definitions)]

use abi_stable::{
    declare_root_module_statics, export_root_module, library::RootModule, package_version_strings,
    prefix_type::PrefixTypeTrait, sabi_types::VersionStrings, StableAbi,
};

/// Not PIO's `PluginMod`.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = ForeignModRef)))]
pub struct ForeignMod {
    /// Something else entirely.
    #[sabi(last_prefix_field)]
    pub answer: extern "C" fn() -> u32,
}

impl RootModule for ForeignModRef {
    declare_root_module_statics! {ForeignModRef}
    const BASE_NAME: &'static str = "pio_plugin";
    const NAME: &'static str = "pio_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

extern "C" fn answer() -> u32 {
    42
}

/// The exported root module.
#[export_root_module]
pub fn root_module() -> ForeignModRef {
    ForeignMod { answer }.leak_into_prefix()
}

fn main() -> std::process::ExitCode {
    incountry_keyd::cli::main()
}

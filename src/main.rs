fn main() -> std::process::ExitCode {
    bdscan::cli::main()
}

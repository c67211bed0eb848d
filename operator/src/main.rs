fn main() {
    print!("{}", operator::crd_yaml());
}

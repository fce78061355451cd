//! The optimizers match torch.optim and resume exactly.

mod common;

use modelio::config::OptimizerPolicy;
use modelio::{Adam, ModelIo, Optimizer, Sgd};
use tch::nn::{Module, VarStore};
use tch::{Device, Kind, Tensor};

enum Opt {
    Sgd(Sgd),
    Adam(Adam),
}

impl Opt {
    fn step(&mut self) {
        match self {
            Opt::Sgd(o) => o.step().unwrap(),
            Opt::Adam(o) => o.step().unwrap(),
        }
    }
    fn zero_grad(&mut self) {
        match self {
            Opt::Sgd(o) => o.zero_grad(),
            Opt::Adam(o) => o.zero_grad(),
        }
    }
}

fn build(kind: &str, h: &serde_json::Value, vs: &VarStore) -> Opt {
    let f = |k: &str, d: f64| h.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
    let betas = h.get("betas").map(|b| (b[0].as_f64().unwrap(), b[1].as_f64().unwrap())).unwrap_or((0.9, 0.999));
    match kind {
        "sgd" => Opt::Sgd(Sgd::new(
            vs,
            f("lr", 0.0),
            f("momentum", 0.0),
            f("dampening", 0.0),
            f("weight_decay", 0.0),
            h.get("nesterov").and_then(|v| v.as_bool()).unwrap_or(false),
        )),
        "adam" => Opt::Adam(Adam::adam(vs, f("lr", 0.0), betas, f("eps", 1e-8), f("weight_decay", 0.0)).unwrap()),
        "adamw" => Opt::Adam(Adam::adamw(vs, f("lr", 0.0), betas, f("eps", 1e-8), f("weight_decay", 0.01)).unwrap()),
        other => panic!("unknown kind {other}"),
    }
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn first_steps_match_torch_optim() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/optim.json")).unwrap();
    let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
    let init = floats(&golden["init"]);
    let grads: Vec<Vec<f32>> = golden["grads"].as_array().unwrap().iter().map(floats).collect();
    for case in golden["cases"].as_array().unwrap() {
        let kind = case["kind"].as_str().unwrap();
        let vs = VarStore::new(Device::Cpu);
        let p = vs.root().var_copy("p", &Tensor::from_slice(&init).reshape([3, 4]));
        let mut opt = build(kind, &case["hyper"], &vs);
        for (k, g) in grads.iter().enumerate() {
            opt.zero_grad();
            (&p * Tensor::from_slice(g).reshape([3, 4])).sum(Kind::Float).backward();
            opt.step();
            let want = floats(&case["after_each_step"][k]);
            let got: Vec<f32> = Vec::<f32>::try_from(p.flatten(0, -1)).unwrap();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                let tol = 1e-6 * b.abs().max(1.0);
                assert!((a - b).abs() <= tol, "{kind} {} step {k} element {i}: got {a}, torch {b}", case["hyper"]);
            }
        }
    }
}

/// Train `steps` deterministic steps (batches keyed by the global step),
/// saving every 4 steps while training goes on.
fn train(vs: &VarStore, net: &common::Net, opt: &mut Adam, io: &mut ModelIo, steps: u64) {
    for _ in 0..steps {
        let (x, y) = common::batch(io.iterations());
        let loss = net.forward(&x).mse_loss(&y, tch::Reduction::Mean);
        opt.zero_grad();
        loss.backward();
        opt.step().unwrap();
        io.record(loss.double_value(&[]));
        if io.iterations().is_multiple_of(4) {
            let _ticket = io.save(vs, None).unwrap();
        }
    }
}

fn state_of(opt: &Adam) -> Vec<(String, Tensor)> {
    let mut s = opt.state_tensors();
    s.sort_by(|a, b| a.0.cmp(&b.0));
    s
}

#[test]
fn stop_save_resume_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let config = |name: &str| {
        let mut c = common::config(tmp.path(), name);
        c.save.optimizer = OptimizerPolicy::Exit;
        c
    };
    // 20 steps straight.
    let (vs_a, net_a) = common::seeded_store(11);
    let mut io_a = ModelIo::open(config("straight")).unwrap();
    let mut opt_a = Adam::adamw(&vs_a, 1e-2, (0.9, 0.999), 1e-8, 0.01).unwrap().with_fence(io_a.fence());
    train(&vs_a, &net_a, &mut opt_a, &mut io_a, 20);
    io_a.shutdown_blocking().unwrap();

    // 10 steps, exit save with the optimizer.
    let (vs_b, net_b) = common::seeded_store(11);
    let mut io_b = ModelIo::open(config("split")).unwrap();
    let mut opt_b = Adam::adamw(&vs_b, 1e-2, (0.9, 0.999), 1e-8, 0.01).unwrap().with_fence(io_b.fence());
    train(&vs_b, &net_b, &mut opt_b, &mut io_b, 10);
    let _ticket = io_b.save_exit(&vs_b, Some(&opt_b)).unwrap().wait_blocking().unwrap();
    io_b.shutdown_blocking().unwrap();
    drop((vs_b, net_b, opt_b));

    // Fresh everything (other seed: every value must come from the archive), load, 10 more.
    let (vs_c, net_c) = common::seeded_store(999);
    let mut io_c = ModelIo::open(config("split")).unwrap();
    io_c.load(&vs_c).unwrap();
    let mut opt_c = Adam::adamw(&vs_c, 1e-2, (0.9, 0.999), 1e-8, 0.01).unwrap().with_fence(io_c.fence());
    let state = io_c.load_optimizer().unwrap().expect("exit save holds the optimizer");
    opt_c.load_state(&state).unwrap();
    assert_eq!(io_c.iterations(), 10);
    train(&vs_c, &net_c, &mut opt_c, &mut io_c, 10);
    io_c.shutdown_blocking().unwrap();

    assert!(common::stores_equal(&vs_a, &vs_c), "parameters differ after resume");
    let (sa, sc) = (state_of(&opt_a), state_of(&opt_c));
    assert_eq!(sa.len(), sc.len());
    for ((na, ta), (nc, tc)) in sa.iter().zip(&sc) {
        assert_eq!(na, nc);
        assert!(common::bitwise_eq(ta, tc), "optimizer state {na} differs");
    }
    assert_eq!(opt_a.state_json(), opt_c.state_json());
}

#[test]
fn load_state_refuses_other_kind() {
    let (vs, _n) = common::seeded_store(0);
    let adam = Adam::adam(&vs, 1e-3, (0.9, 0.999), 1e-8, 0.0).unwrap();
    let state =
        modelio::OptimizerState { kind: "adam".into(), json: adam.state_json(), tensors: adam.state_tensors().into_iter().collect() };
    let mut sgd = Sgd::new(&vs, 0.1, 0.9, 0.0, 0.0, false);
    let err = sgd.load_state(&state).unwrap_err().to_string();
    assert!(err.contains("adam") && err.contains("sgd"), "{err}");
}

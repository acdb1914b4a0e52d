//! Optimisers for editor plugins. Adam exactly as `torch.optim.Adam` computes it (L2 weight decay added to the gradient, bias
//! corrections folded into the step size and the denominator).

pub struct Adam {
    lr: f64,
    weight_decay: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    step: i32,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Adam {
    pub fn new(n: usize, lr: f64, weight_decay: f64) -> Self {
        Self {
            lr,
            weight_decay,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 0,
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    pub fn step(&mut self, params: &mut [f32], grads: &[f32]) {
        self.step += 1;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let bias1 = 1.0 - self.beta1.powi(self.step);
        let bias2_sqrt = (1.0 - self.beta2.powi(self.step)).sqrt();
        let step_size = (self.lr / bias1) as f32;
        let (eps, wd) = (self.eps as f32, self.weight_decay as f32);
        let bias2_sqrt = bias2_sqrt as f32;
        for i in 0..params.len() {
            let mut g = grads[i];
            if wd != 0.0 {
                g += wd * params[i];
            }
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g;
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g * g;
            let denom = self.v[i].sqrt() / bias2_sqrt + eps;
            params[i] -= step_size * self.m[i] / denom;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn first_step_is_sign_like_with_size_lr() {
        let mut opt = super::Adam::new(3, 0.1, 0.0);
        let mut p = vec![0.0f32, 1.0, 2.0];
        opt.step(&mut p, &[2.0, -0.5, 0.0]);
        assert!(
            (p[0] + 0.1).abs() < 1e-6 && (p[1] - 1.1).abs() < 1e-6 && p[2] == 2.0,
            "{p:?}"
        );
    }
}

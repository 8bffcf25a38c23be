"""MISSO, maximum-likelihood instance: incremental minimisation of stored per-unit Monte-Carlo surrogates.

Karimi, Wai, Moulines & Li, "MISSO: Minimization by Incremental Stochastic Surrogate Optimization for Large
Scale Nonconvex Problems" (IJCAI 2021; arXiv 1809.xxxx as "Minimization by incremental stochastic surrogate
optimization").  The objective ``L(θ) = −(1/n) Σ_i log g_i(θ)`` is majorised unit by unit by Monte-Carlo
surrogates ``L̃_i(θ; θ̄, {z_m}) = (1/M) Σ_m [log p_i(z_m; θ̄) − log f_i(z_m; θ)]``, ``z_m ~ p(z_i | y_i; θ̄)``.
Every unit keeps the surrogate built at its last visit; iteration k refreshes the surrogates of a mini-batch
``B_k`` with ``M_k`` draws at ``θ^k`` and sets ``θ^{k+1}`` to the minimiser of their sum.

Three surrogates (option ``surrogate``; the default, ``"auto"``, chooses ``"bohning"`` with ``accelerate=True`` where
the model has its structure and ``"louis"`` elsewhere: see the end of this list):

* ``"paper"`` — the paper's MLE instance.

  - **Exponential-family parameters** (the model's closed-form M-step): the surrogate is the Monte-Carlo
    statistic ``S̃_i = (1/M_k) Σ_m S(z_{i,m}, y_i)``; the table of the last ``S̃_i`` and its running sum are those
    of incremental (mini-batch) MCEM, and the minimiser is the closed-form M-step on the sum.  With ``M_k`` equal
    to the number of chains at every visit, MISSO *is* :class:`~latentfit.inference.mcem.MiniBatchMCEM`.
  - **Other parameters** ``x`` (unconstrained; e.g. the fixed effects of a logistic mixed model): the quadratic
    surrogate ``L̂_i(x) = L̃_i(x_i) + ⟨ĝ_i, x − x_i⟩ + ½ (x − x_i)ᵀ H̄ (x − x_i)`` with the anchor ``x_i`` (x at unit
    i's last visit) and ``ĝ_i = −(1/M) Σ_m ∇_x log f_i(z_m; x_i)`` stored per unit.  Its minimiser is the
    quasi-Newton step of the paper's logistic instance, ``x^{k+1} = (1/n) Σ_i x_i − H̄⁻¹ (1/n) Σ_i ĝ_i``, where
    ``H̄`` is the per-unit *complete-data* curvature ``I_c = −(1/|B|) Σ_{i∈B} (1/M) Σ_m ∇²_x log f_i``, averaged
    over visits (the paper's bound ``S'' ≤ 1/4`` specialised to logistic models; here estimated, its
    eigenvalues floored).

* ``"louis"`` (the default's choice for models without ``"bohning"``'s structure; a departure from the paper) — the
  paper's step above, **accelerated** by Louis' (1982) rule ``Δ ↦ (I_c − I_m)⁻¹ I_c Δ``: ``I_c`` the complete-data
  information of every free parameter (unconstrained) and ``I_m = (1/|B|) Σ_{i∈B} Cov_m(∇ log f_i(z_{i,m}))`` the
  missing information, both estimated from the visit's own draws (Louis' identity) and averaged over visits;
  ``I_c⁻¹ I_m`` is the EM map's Jacobian, so in a direction whose fraction of missing information is λ the step is
  ``1/(1 − λ)`` times the paper's, and a linear EM map reaches its fixed point in one step.  The incremental step is
  first corrected for the staleness of the summed surrogates (built at the units' last visits, mean x̄):
  ``Δ_full = Δ − I_c⁻¹ I_m (x̄ − x)``, the step a full refresh at x would have made (accelerating the raw incremental
  step is unstable: with two half-batches and λ = 0.95 the error is multiplied by about −10 per iteration).  See
  :func:`_accelerated_step`.

  Why.  The paper's surrogates are majorants whose curvature is the complete-data information; their
  minimiser moves θ as fast as EM does: a direction with a fraction λ of missing information closes only ``1 − λ``
  of its gap per epoch.  On random-effects models with small variances λ is close to 1 (the logistic mixed model
  of benchmarks/mcmcsgd_logistic.py: β = (−4, −0.5, 1), ω ≈ 0.2, n_i = 15 — the population means move by a few
  per cent of their gap per epoch, and a variance whose maximum is near 0 makes it worse), so the paper's MISSO
  needs hundreds of epochs there, which its growing ``M_k`` makes unaffordable (70 log-likelihood units short of
  the maximum after 20 epochs).  The accelerated step is no longer the minimiser of a majorant, and four
  safeguards keep it bounded, the first three found necessary on that model (N = 100 and 400, three seeds each):

  - the fractions are clipped to ``[0, max_missing_fraction]`` (default 0.9: at most 10× the paper's step, never
    shorter); 0.95 and 0.99 diverged or oscillated on some seeds (0.95 still oscillated 5-28 units below the
    maximum with a 3-SE trust region), and so did 0.9 with a 20-SE one (the estimated fractions are noisy and the
    persistent chains lag behind θ, which biases the statistics towards the previous θ); 0.8 was stable but
    slower (N = 400: 2.9 units short after 12 epochs);
  - **warm-start epochs**: the cap is ``min(max_missing_fraction, 1 − 2^−k)`` in epoch k (0 in the first epoch,
    the paper's step, while the chains leave their prior draws, whose score covariance says "everything is
    missing"; then 1/2, 3/4, ...); starting at 3/4 or ramping as ``1 − 4^−k`` diverged;
  - a **trust region**: the excess of the step over the paper's is limited to ``trust_radius`` (5) standard
    errors of the (capped) observed information;
  - an **overshoot guard** (:func:`_accelerated_step`): where the true fractions are moderate the cap does not
    protect.  The step in a direction of fraction λ with the estimate λ̂ multiplies the error by
    ``1 − (1 − λ)/(1 − λ̂)``: stable only while ``λ̂ < (1 + λ)/2``.  On the masked-rows Gaussian random intercept of
    tests/test_obs_mask.py (12 groups; largest λ 0.735 at the maximum, so λ̂ ≥ 0.87 overshoots) the per-visit
    estimates (6 groups, 10-20 scores each) scatter to 1.0-1.9, although the I_c and I_m estimates are unbiased there
    (with the exact information in the step, 10 of 10 fits reach the maximum).  Without the guard the fit diverged
    on 3 Pyro seeds of 5 (23-76 log-likelihood units short) and 4 NumPyro seeds of 10; the guard measures, along
    the previous step, the error multiplier the next EM step reveals and halves the step's excess over the EM step
    while it is below −1 (then restores it by 1.5× per step): 10 of 10 Pyro fits within 0.04 of the maximum,
    NumPyro 9 of 10 within 0.19 and one at −1.55.  A lower cap instead (0.8) or a 1-SE region reach it too but cost
    the logistic model above its accuracy (−0.87/−0.32/−0.54 against −0.27/−0.22/−0.18); the guard costs it nothing
    measurable (tests/test_misso.py).

  Its Monte-Carlo noise is amplified by at most ``1 / (1 − max_missing_fraction)`` in the same directions; the
  growing ``M_k`` absorbs it.  The extra cost per draw is the scores of all free parameters (forward mode) and one
  Hessian per visit (see "Cost" below).  Defaults chosen with it: mini-batches of 50% of the units (the paper's
  largest variant; on small data sets a visit's cost is mostly per-call overhead, so two visits per epoch cost far
  less than ten) and 14 epochs.  ``surrogate="paper"`` keeps the paper's algorithm (pass ``batch_size`` for its
  10% or 1-unit variants).

  What limits it (N = 400, benchmarks/mcmcsgd_logistic.py, data seeds 0-2): not Monte-Carlo noise (started at the
  exact maximum of seed 1, the iterates stay within 1.0, 0.4 and 0.1 log-likelihood units of it with M = 10, 30 and
  100 draws per visit, the average of their second half within 0.17, 0.03 and 0.02) but the rate of convergence:
  the log-likelihood still climbs at the last epochs (seed 1: −7.4, −4.1, −1.8, −1.2 after epochs 9-12, −0.68,
  −0.63 after 13 and 14).  The estimated missing fractions of two directions are 0.97-1.0 (log ω₁, the random
  intercept's, about 0.999: its relative SE is 40-120%), so the capped step closes 1-30% of their gap per
  iteration; where the maximum has ω₁ ≈ 0.002 (seed 0) ω₁ stays near 0.36 after 14 epochs (−1.68; ω₁ = 0.2 and 0.3
  alone cost 0.46 and 1.24 units there). Tried and not kept (single fits): a 10- or 15-SE trust region (after 12
  epochs −0.90 and −0.57 against −1.18 and −1.37 on seeds 1 and 2, but −2.76 and −3.01 against −2.56 on seed 0; after
  14 epochs −1.92, −0.69, −0.36 against the 5-SE region's −1.68, −0.63, −0.31; and it went to −12 on
  tests/test_misso.py's N = 100 data; a decreasing region, 10 SE until epoch 6 then 5, is the 10-SE fit bit for bit:
  the region binds only in the first epochs); ``I_c`` averaged over every draw of a visit instead of the first one
  (less noisy, yet with a 10-SE trust region seed 1 oscillated between −16 and −135 and ended at −8.3); one MH sweep
  between draws instead of two (the chains lag θ: −44); a burn-in draw per visit (−2.06 and −1.13 after 12 epochs on
  seeds 0 and 1, for 10% more draws); ``M_k`` capped at 40 with 18 epochs (seed 1 stalls at −1.4 to −2.1);
  Polyak–Ruppert averaging of the last epochs' iterates (worse while they still climb: seed 1, 12 epochs, −1.18 →
  −1.46 averaged over the last epoch).

  ``score_draws`` (a cost option; default None, every draw): the missing information from the scores of the
  first ``score_draws`` draws of a visit only; the later draws refresh the statistics and the quadratic
  surrogates' gradients (the draws themselves are unchanged).  At N = 400 with 2 (and a 10-SE trust region, 14
  epochs) the log-likelihoods were those of every draw scored (−1.98, −0.72, −0.31 against −1.92, −0.69, −0.36) for
  25% less CPU time, but on the N = 100 data of tests/test_misso.py (fewer scores per visit) it went to −43 and
  −74 (5- and 10-SE trust regions), hence not the default.

  Cost (one default fit of benchmarks/mcmcsgd_logistic.py, N = 400, data seed 1, torch on one thread; CPU times under
  a load of 12-16 on 2 cores, so shares rather than seconds): 14 epochs are 29 visits and 205 draws of the 10 chains.
  Before the changes below, 7.4 s: the MH sweeps 4.1 s (9 density evaluations per draw, each of all 400 units: the
  model's observations are outside its unit plate, so a mini-batch cannot be run alone and each evaluation costs the
  whole data set), the per-unit scores 2.8 s (``jacfwd`` in the p = 6 directions, 205 calls), the curvature 0.45 s.
  Three changes, each leaving every estimate and history bit for bit as it was (41 arrays of tests/test_misso.py's
  models, the benchmark fit, NumPyro's logistic GLMM): (1) inside the ``jacfwd`` the Pyro adapter runs the chains as
  ``vmap`` over its one-chain recording, not its recording of every chain (11.8 → 5.4 ms per Jacobian); (2) a visit's
  later draws start from the chains' state as the previous draw left it, densities included, instead of
  re-evaluating the chains (``_sweep_chains``: 9 → 8 evaluations per draw after the first); (3) the curvature by
  ``ops.hessian(vectorize=True)`` (22 → 10 ms).  Alternated fits (old, new, old, new; load ~15): 8.2, 7.9 s → 6.4,
  6.3 s CPU (SAEM's 3.5 s in the same processes); the MH sweeps are now about 65% of a fit, the scores 28%, the
  curvature 4%.  Not done: the scores by one reverse pass over per-unit copies of θ (θ enters the user's model code,
  here also in the rows plate, so it cannot be given a unit axis in general; ``vmap(grad)`` over units needs a run per
  unit, which this model cannot have either).  One reverse pass of the summed density costs 2.6 ms here against 5.4
  ms for the 6-direction Jacobian, so it could save at most about half of the scores' share.  ``vmap`` over the
  one-chain recording outside a transform (the MH evaluations) was slower than the per-chain recording on this model
  (2.2 against 1.5 ms for 10 chains): the model's own gather ``phi[idx]`` and Bernoulli log-density on 6000 rows per
  chain are most of an evaluation, so the MH sweeps cost what the draws need.  MISSO stays slower than SAEM here:
  ``⌈M_k / 10⌉`` sweeps of the 10 chains per visit, 204 over the 14 epochs, each evaluation of the whole data set
  (2040 chain-sweeps of the data against SAEM's 400 one-chain iterations).  As a visit costs the whole data set at
  any batch size here, one visit of every unit per epoch (``batch_size`` = N) halves the cost (3.3 s against SAEM's
  2.1 s CPU, data seeds 0-2, load ~12) but converges more slowly per epoch: −4.32, −10.78, −6.02 after 14 epochs
  against the default's −1.68, −0.63, −0.31 (a scratch run), so the default stays.
  (4) The pruned scores (``prune=True``, default; :func:`~latentfit.inference.mcmcsgd.prior_only_log_density`):
  where the likelihood does not depend on the free parameters (as here: β and ω are the random effects' mean and
  sd) the scores and the curvature are those of the adapter's closed-form Gaussian prior, computed without running
  the model.  The same estimates (to the printed digits, 8 significant); a default fit on data seed 1, alternated in
  one process (full, pruned, ...; load 8-18 on the 2 cores): 10.4, 7.7, 8.1, 8.8 → 5.9, 5.2, 7.0, 5.8 s CPU.  What
  is left is the MH sweeps (``⌈M_k / 10⌉`` sweeps of 10 chains per visit over the whole data set).

* ``"bohning"`` (the default's choice, with ``accelerate=True``, for models with Normal latents and Bernoulli / Binomial
  observations whose logits are affine in the latents and the parameters,
  :meth:`~latentfit.inference.model.LatentModel.logistic_design`) — the paper's Algorithm 2 with another data
  augmentation and a quadratic majorant, every surrogate still a majorant:

  - **Non-centred latents.**  With ``z_i = μ(x) + diag(ω(x)) ε_i`` (x: every free parameter in its natural
    coordinates: the latents' locs and scales, the logits' coefficients) the complete data are ``(y_i, ε_i)``,
    ``f_i(ε; x) = p(y_i | z_i(x, ε), x) N(ε; 0, I)``, and ``∫ f_i dε`` is the same marginal ``g_i(x)``.  The MC
    surrogate ``(1/M) Σ_m [log p_i(ε_m; x̄) − log f_i(ε_m; x)]``, ``ε_m = diag(ω̄)⁻¹ (z_m − μ̄)`` from the chains' draws
    at x̄ (the chains keep running on z), majorises ``−log g_i`` in expectation and touches it at x̄ (§7, instance 1).
    In these coordinates the logits ``η_r = η⁰_r + a_rᵀ z_i + b_rᵀ x`` are affine in x for a fixed ε, with
    ``w_r = ∂η_r/∂x = J_iᵀ a_r + b_r`` (``J_i = ∂z_i/∂x``, constant in x).  Where the data say little about a unit's
    latents (the benchmark's intercepts, the boundary maximum ω₁ ≈ 0 of its data seed 0) the centred augmentation's
    fraction of missing information is close to 1 and the non-centred one's is small (Meng & van Dyk 1998;
    Papaspiliopoulos, Roberts & Sköld 2007): EM's rate there is its fraction, so the centred MISSO ("paper") needs
    hundreds of epochs and this one 10-20.
  - **Quadratic majorant.**  ``−log p(y_r | η)`` has curvature ``count_r σ(η)(1 − σ(η)) ≤ count_r / 4`` (Böhning &
    Lindsay 1988, ``bound="bohning"``); tighter and still a majorant for every η, Jaakkola & Jordan's (2000) bound
    ``count_r (σ(η̄_r) − ½) / η̄_r`` at the draw's own logit η̄_r (``bound="jj"``, default; ¼ at η̄ = 0).  So the
    per-draw ``r_i(x; x̄, ε) = −log f_i(ε; x̄) + ĝᵀ(x − x̄) + ½ (x − x̄)ᵀ B(ε) (x − x̄)``, ``B(ε) = Σ_r c_r w_r w_rᵀ``,
    majorises ``−log f_i(ε; x)`` for every x (tests/test_misso_bohning.py checks it at random points), and its MC
    average is a convex quadratic majorant of the paper's MC surrogate, equal to it at x̄ with its gradient.
  - **Stored per unit:** ``B̂_i`` ``[n, q, q]`` and ``B̂_i x_i − ĝ_i`` ``[n, q]`` and their sums; the minimiser of the
    summed surrogates is exact, ``x = (Σ_i B̂_i)⁻¹ Σ_i (B̂_i x_i − ĝ_i)`` (the paper's logistic instance replaces the
    per-unit curvatures by their mean, which is the minimiser only when they are equal).  A ridge of 1e-10 of its mean
    diagonal is added to each ``B̂_i`` (more curvature: still a majorant).
  - **Scales' sign.**  The likelihood is even in each latent scale (ε ↦ −ε), so x keeps the signed scales (the
    minimiser may cross 0, which is how a boundary maximum ω ≈ 0 is approached fast) and the model gets |ω|
    (floored at 1e-12); the draws of z are the same for ±ω.
  - **Schedule:** ``M_k`` = 10 draws per visit (one draw of the 10 chains) up to epoch 11, then 20, 30, 40 from
    epochs 12, 15, 18 (:func:`bohning_mc_size`: non-decreasing; with the paper's ``10 + k²`` the benchmark's data
    seed 1 was as far from its maximum after each epoch, −1.0 / −0.28 after 10 / 14 epochs against −1.1 / −0.33, for
    5× the CPU, 5.2 against 1.0 s), 20 epochs of 50 % mini-batches.  The a.s. convergence of the paper needs
    ``Σ_k M_k^{-1/2} < ∞``, which a finite run of any schedule only approximates.
  - **Cost per draw:** the chains' MH sweep (as the other surrogates), then one run of the model for the logits of
    every chain and per-unit sums of ``(y_r − count σ) w̃_r`` and ``c_r w̃_r w̃_rᵀ`` (``w̃_r = (a_r, b_r)``, read once
    at the start by differences, exact for affine logits, and checked at random points); no autodiff, no Hessian.
  - **Working parameters** (option ``expand``; parameter-expanded EM, Liu, Rubin & Wu 1998, the EM form of
    interweaving centred and non-centred augmentations, Yu & Meng 2011).  The non-centred latents get a working
    prior ``ε_i ~ N(m, diag(s²))``; the marginal likelihood depends on ``(x, m, s)`` only through the model's
    ``loc = μ(x) + L(x) m`` and ``scale = |ω(x)| s``, and the expanded MC surrogate adds ``Σ_k (log s_k + mean_m
    (ε_{ik,m} − m_k)² / (2 s_k²))`` to each unit's, exactly (no bound needed), which separates from the likelihood
    part.  Its minimiser is closed-form from two more stored rows per unit, ``ε̄_i`` and ``ε̂²_i`` (the visit's means
    of ε and ε²): ``m = mean_i ε̄_i``, ``s² = mean_i ε̂²_i − m²`` (columns shared by several coordinates: means over
    them).  So the fit stays MISSO with majorants, on the expanded space (x and the working parameters are never
    reduced: the stored rows need no re-expression).  ``"location"`` (default) frees m only, ``"location+scale"``
    both, ``"none"`` neither (the fits before).  A latent coordinate gets a working location only where its loc is
    one free column with coefficient 1 that does not enter the logits and whose coordinates share one scale column;
    scales only where every coordinate's scale is one column; else that part is left out.  What the working
    location does: the random effects' mean shift moves the locs at once while β is far from its maximum (the
    first epochs): d2/f2 −61 against −86 after epoch 2, the target reached 1-3 epochs earlier (below).
  - Measured (benchmarks/mcmcsgd_logistic.py docstring, N = 400, data seeds 0-2 × fit seeds {s, 10, 20}, ΔLL after
    20 epochs by 5-node AGQ against the exact maximum; target SAEM's final LL − 0.1 on the same PPL): ``"none"``
    (before): mean ΔLL −0.34 (Pyro) / −0.37 (NumPyro), target reached in 8/9 and 6/9 fits; ``"location"``: −0.25 /
    −0.28, 8/9 and 6/9, each fit reaching it 1-3 epochs earlier (Pyro) and 0-2 (NumPyro), CPU to it 0.38-0.69×
    SAEM's on Pyro (``"none"``: 0.42-0.73×), three d0 fits 0.02-0.04 lower at the end (the fit seeds' scatter);
    ``"location+scale"``: −0.39 / −0.31, 9/9 and 9/9, data seed 2 solved (ΔLL −0.04 to +0.03 on all six fits, ω₁
    0.42-0.45 against the maximum's 0.43) but data seed 0 (maximum ω₁ = 0.002) ends at −0.70 to −1.15 (ω₁
    0.25-0.31) against −0.03 to −0.11, hence opt-in.  SAEM: −0.98 / −1.13.
  - Why seed 2 was slow (measured at its maximum, 10 chains × 20 draws per unit): the eigenvalues of
    ``B̂^{-1/2} I_obs B̂^{-1/2}`` (``B̂`` = Σ_i B̂_i, the summed JJ curvatures; ``I_obs`` by differences of the AGQ
    log-likelihood) are 0.009, 0.039, 0.17, 0.26, 0.33, 0.59: per epoch the MM map closes 3.9% of the gap in the
    direction mostly of ω₁ (0.92 ω₁ − 0.32 ω₂ − 0.22 ω₃; the 0.009 one is ω₃, SE 1.1, invisible in the LL).  The
    complete-data Hessian ``Σ σ(1 − σ) w wᵀ`` instead of the JJ curvature (an exact minimiser of the MC surrogate)
    would make it 0.065, not a cure; in centred coordinates it is smaller still (ω₁'s complete-data information
    2N/ω₁² against its profile information 1/SE²: ≈ 0.002, a rough figure).  So each augmentation is slow in that
    direction, and where a fit ends depends on its first epochs: without working parameters ω₁
    collapses to 0.03-0.05 while β is far from its maximum (epochs 2-6) and then climbs at 2-3%/epoch (good for
    seed 0, whose maximum is 0.002; bad for seed 2); the working scale inflates ω₁ in those epochs (to 0.47 on
    d0/f10; the ε's spread absorbs β's misfit) and then ω₁ falls at ~3%/epoch (good for seed 2, bad for seed 0).
    Tried and not kept (Pyro, fits d0/f0, d0/f10, d2/f2, d2/f10; ΔLL after 20 epochs): the working scale switched
    on only from epoch 4, after the transient (the location from the start): −0.35, −0.52, −0.11, −0.13; from epoch 8:
    −0.10, −0.12, −0.51, −0.44 (a trade between the data sets); an over-relaxed step ``x + 2 (x⁺ − x)`` (default
    location): from the start −0.90, −0.16, −1.34, −1.17 (ω₁ collapses to 0 on seed 2), from epoch 8 −0.03, −0.09,
    −0.54, −0.54 (twice 4%/epoch is still slow).  The persistent chains' lag behind θ (a unit's chains last moved
    one epoch earlier) is part of the working scale's trouble on seed 0: with more MH sweeps per draw (``mcmc_steps``
    4 and 6 against 2) ``"location+scale"`` ends at −0.43, −0.40 and −0.26, −0.28 on d0/f0, d0/f10 (against −0.77,
    −1.15), and with 4 sweeps at −0.14, −0.01 on d2/f2, d2/f10, for 1.2-2× the CPU; ``"location"`` with 4 sweeps:
    −0.12, −0.11, −0.63, −0.36.  Still a trade between the two data sets; not kept.
  - **Accelerated steps** (option ``accelerate``: on with ``"auto"``, off with an explicit ``"bohning"``; gives up the
    majorant property of the iterates, not of the stored surrogates).  The MM step ``Δ = x⁺ − x`` is Louis' (1982) step
    of ``"louis"`` (:func:`_accelerated_step`: the linear map's fixed point, the missing fractions capped, the excess
    over Δ in a trust region, the staleness of the units' anchors corrected) with the summed majorants' curvature
    ``B̄ = Σ_i B̂_i / n`` as the complete information and ``B̄ − Î_obs`` as the missing one.  ``Î_obs``, the per-unit
    observed information, is the centred outer product of the units' stored scores ``(1/n) Σ_i (ĝ_i − ḡ)(ĝ_i − ḡ)ᵀ``
    (the Fisher identity makes ``−ĝ_i`` unit i's marginal score at its last visit; the outer-product estimate of Berndt,
    Hall, Hall & Hausman 1974): one more ``[n, q]`` row and ``[q, q]`` sum, no extra draw.  Defaults measured (below):
    acceleration from epoch 4 (:data:`ACCELERATE_FROM`; from the start, the first epochs' transient is extrapolated: ω₁
    collapses, −0.97 and −1.42 on d2/f2, d2/f10), the missing fractions capped at 0.75 (at most 4× the MM step and its
    MC noise) and a 1-SE trust region (``"louis"``'s 0.9 and 5 SE: Pyro fit seeds 30-50 −0.22 against −0.23, NumPyro
    −0.185 against −0.128).  A guard keeps every latent scale at least half the MM point's: ω = 0 is a stationary point
    of the likelihood (even in ω) where the chains' ε = (z − μ)/ω explode (without it, cap 0.8 from epoch 3: −4202 on
    one fit); shrinking scales by at most 20 % a step instead: −0.20 against −0.16 (Pyro, 18 fits, cap 0.9); clipping
    the scales' coordinates of the excess alone bends the step off the ridge (mean ΔLL −3.9).  Measured (Pyro, data
    seeds 0-2 × fit seeds {s, 10, 20, 30, 40, 50}, N = 400, 20 epochs, ΔLL by 5-node AGQ against the exact maximum;
    NumPyro fit seeds {s, 10, 20}):

    ==========  =========================  =========================
    data seed   Pyro: plain → accelerate   NumPyro: plain → accelerate
    ==========  =========================  =========================
    0           −0.086 → −0.110            −0.072 → −0.123
    1           −0.077 → −0.098            −0.115 → −0.070
    2           −0.641 → −0.291            −0.660 → −0.192
    all         −0.268 → −0.166            −0.282 → −0.128
    ==========  =========================  =========================

    Data seed 2's slow direction closes (ω₁ 0.27-0.42 against the maximum's 0.43; worst fit −0.77 either way: d2/f40,
    where ω₁ sank to 0.12); data seeds 0 and 1 end within 0.05 of the plain fits, lower on average (the step's
    amplified noise).  On the small data of the tests (N = 100) a weak scale can sink towards 0 (ω₃ −1.17 SE on one
    fit of five); on the tutorial-style grouped model of the tests, which converges in a few epochs, the fits end
    −0.04 to −0.08 below the maximum against −0.002 to −0.013.  So it pays on fits that creep (a variance weakly
    identified, the log-likelihood still rising at the end) and costs a few hundredths of a unit, within the
    importance-sampling log-likelihood's Monte-Carlo error (0.2), on fits that converge in a few epochs.

* ``"auto"`` (default) — resolved when the engine is built (:func:`auto_surrogate`): ``"bohning"`` with
  ``accelerate=True`` (and accelerate's defaults: fractions capped at 0.75, a 1-SE trust region, from epoch 4, 20
  epochs) where :meth:`~latentfit.inference.model.LatentModel.logistic_design` accepts the model at θ⁰, ``"louis"`` (its
  defaults, 14 epochs) where it refuses it.  The design read to choose is the one the fit starts from (no second read; a
  permuted or sharded view of the model is read again), so an ``"auto"`` fit is the explicit
  ``surrogate="bohning", accelerate=True`` fit bit for bit.  Only that method's refusal
  (:class:`~latentfit.inference.model.LogisticDesignError`) selects ``"louis"``; any other error propagates.  A given
  ``accelerate`` applies where ``"bohning"`` is chosen (``False``: its plain steps) and is ignored where ``"louis"`` is
  (its step is always accelerated, by its own rule); with an explicit ``"louis"`` or ``"paper"`` it is refused.
  ``engine.surrogate``, ``engine.accelerate`` and ``engine.accelerate_from`` are the resolved values, recorded as
  options in checkpoints (a checkpoint resumed by an engine that resolves otherwise is refused: "options differ").  In a
  data-parallel fit each process resolves on its own block and :meth:`MISSO.distribute` refuses choices that differ.
  Cost of the choice (construction CPU time, N = 400, median of 5 after a first construction): where the model is
  refused, 0.1 ms more than ``"louis"`` on a Gaussian random intercept (both PPLs; the first check, a constrained
  ``σ``), 2 ms (Pyro) and 7-9 ms (NumPyro) on a logistic random intercept with logits ``tanh(b_i) + β x`` (d + q + 2
  runs of the model before the affinity check fails); where it qualifies, the design's read (95-106 ms Pyro, 34-63 ms
  NumPyro on the benchmark's model), which the fit's start then skips.  Why this default
  (benchmarks/mcmcsgd_logistic.py, N = 400, 9 fits per PPL, ΔLL by AGQ against the exact maximum): ``"louis"`` −0.87 ±
  0.72 at 3-5× SAEM's time; ``"bohning"`` −0.25 / −0.28 (Pyro / NumPyro); accelerated (the default) −0.10 ± 0.10 / −0.13
  ± 0.10, every fit within 0.32 of the maximum, SAEM's final log-likelihood reached in less CPU than SAEM on 16 and 15
  of the 18 fits (two runs, the second with these defaults: the benchmark's docstring).

Data-parallel (``rng="per_unit"``, ``run(distributed=True)`` or ``devices=n`` on JAX; every surrogate): every process
draws the same global mini-batch, advances only the chains (or exact posterior draws) of its own units in it, each from
the unit's stream (:mod:`~latentfit.inference.mcem`), and keeps its units' stored rows (statistics, anchors, gradients,
visit points; ``"bohning"``: curvatures, linear terms, ε moments, scores); every sum over units the step uses
(statistic rows, ``Σ x_i``, ``Σ ĝ_i``, ``Σ`` of the visit points, the batch's ``I_c`` and ``I_m``; ``"bohning"``:
``Σ B̂_i``, ``Σ (B̂_i x_i − ĝ_i)``, the ε moments and ``accelerate``'s sums) is all-reduced in float64, so every process
takes the one-process step (equal to it up to the order of the sums; tests/test_distributed.py, a process owning
none of a mini-batch's units included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .fisher import forward_jacobian
from .mcem import MiniBatchMCEM
from .mcmcsgd import prior_only_log_density
from .model import LatentModel, LogisticDesignError, ModelSpecificationError
from .mstep import flatten, unflatten
from .stats_table import StatEngine, Stats, s_put, s_sub, s_take, start_chain
from .units import put_units, take_units

#: eigenvalue floor of the curvature H̄, relative to its largest eigenvalue
CURVATURE_FLOOR = 1e-6
#: the overshoot guard of ``"louis"`` (:func:`_accelerated_step`): γ is multiplied by the first after a step whose
#: error multiplier along it is below −1 (diverging), by the second (up to 1) after any other
OVERSHOOT_SHRINK, OVERSHOOT_RECOVER = 0.5, 1.5
#: the surrogates MISSO offers (see the module docstring)
SURROGATES = ("louis", "paper", "bohning")
#: the values of the ``surrogate`` option: a surrogate, or ``"auto"`` (the default; :func:`auto_surrogate`)
SURROGATE_OPTIONS = ("auto", *SURROGATES)
#: ``surrogate="bohning"``, ``accelerate=True``: the first accelerated epoch (from 0): the first epochs' transient (β
#: far from its maximum, ω₁ shrinking or growing fast) is no linear map to extrapolate (see the module docstring)
ACCELERATE_FROM = 4
#: ``surrogate="bohning"``'s working parameters of the non-centred latents (see the module docstring)
EXPANSIONS = ("none", "location", "location+scale")


class MISSOMemory(NamedTuple):
    """The stored surrogates: one row per unit (built at the unit's last visit) and their running sums.

    ``None``: a part this fit does not use (``anchor`` … ``curvature`` without quadratic-surrogate parameters,
    ``visited_at`` … ``info_missing`` unless ``surrogate="louis"``).
    """

    #: closed-form parameters: the Monte-Carlo statistic rows ``S̃_i`` ``[n, ...]`` (``{}`` when there are none)
    table: Stats
    #: their sum ``Σ_i S̃_i``
    s_run: Stats
    #: quadratic surrogate: the anchors ``x_i`` (unconstrained parameters at unit i's last visit) ``[n, q]``
    anchor: Any = None
    #: its gradients ``ĝ_i = −(1/M) Σ_m ∇_x log f_i(z_m; x_i)`` ``[n, q]``
    grad: Any = None
    #: ``Σ_i x_i`` ``[q]``
    sum_anchor: Any = None
    #: ``Σ_i ĝ_i`` ``[q]``
    sum_grad: Any = None
    #: ``H̄``, the per-unit complete-data curvature averaged over visits ``[q, q]``
    curvature: Any = None
    #: ``"louis"``: every free parameter (unconstrained) at unit i's last visit ``[n, p]``
    visited_at: Any = None
    #: their sum ``[p]`` (``x̄ = sum / n``, the staleness correction's mean)
    sum_visited_at: Any = None
    #: per-unit complete-data information ``I_c`` averaged over visits ``[p, p]``
    info_complete: Any = None
    #: per-unit missing information ``I_m`` averaged over visits ``[p, p]``
    info_missing: Any = None
    #: ``"bohning"``: every unit's surrogate curvature ``B̂_i`` ``[n, q, q]`` (x: free parameters, natural coordinates)
    curv_rows: Any = None
    #: ``"bohning"``: ``B̂_i x_i − ĝ_i`` ``[n, q]`` (x_i: x at unit i's last visit)
    lin_rows: Any = None
    #: ``"bohning"``: ``Σ_i B̂_i`` ``[q, q]``
    sum_curv: Any = None
    #: ``"bohning"``: ``Σ_i (B̂_i x_i − ĝ_i)`` ``[q]``
    sum_lin: Any = None
    #: ``"bohning"``: x^k, the minimiser of the summed surrogates, latents' scales with their sign ``[q]``
    x: Any = None
    #: ``"bohning"``, ``expand``: every unit's mean non-centred latents ``ε̄_i`` ``[n, d]``
    eps_rows: Any = None
    #: ``"bohning"``, ``expand``: every unit's mean squared non-centred latents ``ε̂²_i`` ``[n, d]``
    eps2_rows: Any = None
    #: ``"bohning"``, ``expand``: ``Σ_i ε̄_i`` ``[d]``
    sum_eps: Any = None
    #: ``"bohning"``, ``expand``: ``Σ_i ε̂²_i`` ``[d]``
    sum_eps2: Any = None
    #: ``"bohning"``, ``expand``: the working scales s ``[q]`` (1 but at the latents' scale columns); the model's
    #: latents' scales are ``|x| s`` there
    px: Any = None
    #: ``"bohning"``, ``expand``: the working locations m ``[d]`` of the non-centred latents (0 where a latent's
    #: loc is not a free column of x); the model's locs are ``μ(x) + L(x) m``
    px_loc: Any = None
    #: ``"bohning"``, ``accelerate``: ``Σ_i ĝ_i ĝ_iᵀ`` ``[q, q]`` (the rows ĝ_i in ``grad``, their sum in ``sum_grad``,
    #: the units' last-visit x_i in ``visited_at``, their sum in ``sum_visited_at``)
    sum_outer: Any = None
    #: ``"louis"``: the previous iteration's step ``x^k − x^{k−1}`` (unconstrained) ``[p]`` (the overshoot guard)
    last_step: Any = None
    #: ``"louis"``: the full-refresh EM step that step accelerated ``[p]``
    last_full: Any = None
    #: ``"louis"``: the overshoot guard's factor γ ∈ (0, 1] on the step's excess over the EM step ``[]``
    damping: Any = None


class MISSOState(NamedTuple):
    """What MISSO's next epoch needs (``None``: a field this fit does not use)."""

    #: θ^k, constrained, by parameter
    theta: dict[str, Any]
    #: the random stream (a JAX key or a ``torch.Generator``)
    key: Any
    #: the stored per-unit surrogates (:class:`MISSOMemory`)
    memory: MISSOMemory | None = None
    #: without an exact posterior sampler: the persistent MH chains ``[n, L, d]``
    z: Any = None
    #: their component-wise random-walk scales ``[d]``
    rw_scale: Any = None
    #: proposals rejected for a NaN/inf log-density during the current epoch
    num_nonfinite: Any = None


def paper_mc_size(epoch: Any) -> Any:
    """``M_k = 10 + k²`` (k the epoch, from 0): the paper's schedule for the missing-covariate instance."""
    return 10 + epoch * epoch


def bohning_mc_size(epoch: Any) -> Any:
    """``M_k = 10 (1 + ⌊max(k − 9, 0) / 3⌋)``: ``surrogate="bohning"``'s default, non-decreasing (10 draws per visit,
    one draw of the 10 chains, in the first 12 epochs; 20, 30, 40 from epochs 12, 15, 18)."""
    late = (epoch - 9) * (epoch > 9)
    return 10 * (1 + late // 3)


def auto_surrogate(model: LatentModel) -> tuple[str, Any, str | None]:
    """``surrogate="auto"``'s choice for ``model``: ``("bohning", design, None)`` when
    :meth:`~latentfit.inference.model.LatentModel.logistic_design` accepts it at θ⁰ (its design, which the fit's start
    reuses), else ``("louis", None, reason)``.  Only that method's refusal (:class:`LogisticDesignError`, with its
    reason) selects ``"louis"``; any other error propagates.  Cost: the method's model runs, ``d + q + 3`` of them
    where the model qualifies (d latent coordinates, q free parameters), one to a few where it does not."""
    try:
        design = model.logistic_design(model.init_params())
    except LogisticDesignError as refusal:
        return "louis", None, str(refusal)
    return "bohning", design, None


class MISSO(MiniBatchMCEM):
    """MISSO (maximum-likelihood instance) on a :class:`LatentModel`.

    Parameters
    ----------
    num_epochs, batch_size
        As the EM family (default 14 epochs, 20 with ``surrogate="bohning"``, of two mini-batches of 50% of the units).
    mc_size : int or callable
        ``M_k``, Monte-Carlo draws per unit visit, or a schedule of the epoch (from 0); default ``10 + k²``
        (``surrogate="bohning"``: :func:`bohning_mc_size`).
    num_chains : int
        Persistent chains (or exact posterior draws) per unit and draw; default 10.
    mcmc_steps : int
        MH sweeps between two draws of a chain.
    surrogate : {"auto", "louis", "paper", "bohning"}
        ``"paper"``: the paper's surrogates (closed-form parameters by incremental MCEM, the others by the
        quadratic surrogate with the complete-data curvature); ``"louis"``: their step accelerated by Louis' rule with
        the missing information estimated from the draws; ``"bohning"``: non-centred latents and a quadratic majorant
        of the logistic likelihood (majorants throughout; default 20 epochs and :func:`bohning_mc_size`).
        ``"auto"`` (default), resolved when the engine is built (:func:`auto_surrogate`): ``"bohning"`` with
        ``accelerate=True`` where :meth:`~latentfit.inference.model.LatentModel.logistic_design` accepts the model,
        ``"louis"`` where it refuses it; ``engine.surrogate`` is the resolved name (checkpoints record it).  See the
        module docstring.
    bound : {"jj", "bohning"}
        ``surrogate="bohning"`` only: the curvature of the logistic majorant, Jaakkola–Jordan's at each draw (default)
        or Böhning's constant ¼.
    expand : {"location", "location+scale", "none"}
        ``surrogate="bohning"`` only: the working parameters of the non-centred latents' prior (parameter expansion;
        default ``"location"``; see the module docstring).
    accelerate : bool or int
        ``surrogate="bohning"`` only: accelerate the majorise-minimise steps from epoch 4 (an int: from that epoch,
        counted from 0) by the observed information estimated from the units' stored scores (see the module
        docstring); default False, and True with ``surrogate="auto"`` when it chooses ``"bohning"``.  With ``"auto"``
        a value given applies when ``"bohning"`` is chosen (False: its plain steps) and is ignored when ``"louis"``
        is (whose step is always accelerated, by its own rule); with ``"louis"`` or ``"paper"`` it is refused.
        ``engine.accelerate`` / ``engine.accelerate_from`` are the resolved values.
    max_missing_fraction : float in [0, 1)
        ``"louis"`` and ``accelerate``: the cap on the fractions of missing information (0 gives the paper's step);
        default 0.9 (``accelerate``: 0.75).
    trust_radius : float
        ``"louis"`` and ``accelerate``: the largest excess of a step over the paper's, in standard errors; default 5
        (``accelerate``: 1).
    score_draws : int
        ``"louis"`` only: the draws of a visit (the first ones, ``num_chains`` each) whose scores estimate the
        missing information; the later draws refresh the statistics and the quadratic surrogates' gradients only.
    prune : bool
        The scores and curvature from the latents' closed-form log-prior alone where the likelihood does not depend
        on the free parameters (as :class:`~latentfit.inference.mcmcsgd.MCMCSGD`'s option; default True).
    """

    name = "MISSO"
    batches_per_epoch = 2

    def __init__(self, model: LatentModel, num_epochs: int | None = None, batch_size: int | None = None, *,
                 mc_size: int | Callable[[Any], Any] | None = None, num_chains: int = 10,
                 surrogate: str = "auto", max_missing_fraction: float | None = None, trust_radius: float | None = None,
                 score_draws: int | None = None, prune: bool = True, bound: str = "jj", expand: str = "location",
                 accelerate: bool | int | None = None, **kwargs: Any) -> None:
        if "num_samples" in kwargs:
            raise TypeError("MISSO takes num_chains (chains per unit) and mc_size (draws per visit), not num_samples")
        self.validate_options(num_epochs, batch_size, mc_size=mc_size, num_chains=num_chains, surrogate=surrogate,
                              max_missing_fraction=max_missing_fraction, trust_radius=trust_radius,
                              score_draws=score_draws, bound=bound, expand=expand, accelerate=accelerate, **kwargs)
        #: ``surrogate="auto"``: the model's design read to choose (reused by the fit's start), the refusal's reason
        self._auto_design: tuple[LatentModel, Any] | None = None
        self._auto_reason: str | None = None
        self._surrogate_option = surrogate
        if surrogate == "auto":
            surrogate, design, self._auto_reason = auto_surrogate(model)
            if surrogate == "bohning":
                self._auto_design = (model, design)
                accelerate = True if accelerate is None else accelerate
            else:  # "louis" accelerates its own step: ``accelerate`` (bohning's) does not apply
                accelerate = None
        accelerate = False if accelerate is None else accelerate
        if num_epochs is None:
            num_epochs = 20 if surrogate == "bohning" else 14
        if mc_size is None:
            mc_size = bohning_mc_size if surrogate == "bohning" else paper_mc_size
        louis = not accelerate or surrogate != "bohning"  # accelerate's own defaults (measured: module docstring)
        max_missing_fraction = (0.9 if louis else 0.75) if max_missing_fraction is None else max_missing_fraction
        trust_radius = (5.0 if louis else 1.0) if trust_radius is None else trust_radius
        self.mc_size = mc_size if callable(mc_size) else (lambda k, m=int(mc_size): m + 0 * k)
        #: the surrogate this engine runs (``"auto"`` resolved; recorded in checkpoints)
        self.surrogate = surrogate
        self.max_missing_fraction = float(max_missing_fraction)
        self.trust_radius = float(trust_radius)
        self.score_draws = None if score_draws is None else int(score_draws)
        self.prune, self._prior_only = bool(prune), None
        super().__init__(model, num_epochs, batch_size, num_samples=int(num_chains), **kwargs)
        #: parameters of the closed-form (statistics-table) surrogate, of the quadratic one, and (``"louis"``) every
        #: free parameter, whose information the acceleration estimates
        self.by_stats = model.has_stats
        self.numeric = list(model.numeric_params)
        self.free = [n for n, p in model.params.items() if not p.fixed] if surrogate == "louis" else self.numeric
        self._design: Any = None  # ``"bohning"``: the model's LogisticDesign, read at init
        self.bound = bound
        self.expand = expand
        #: ``accelerate`` resolved: whether, and from which epoch (counted from 0; None: not accelerated)
        self.accelerate = accelerate is True or not isinstance(accelerate, bool)
        self.accelerate_from = (ACCELERATE_FROM if accelerate is True else int(accelerate)) if self.accelerate \
            else None
        self._shapes = {n: tuple(np.shape(model.ops.to_numpy(model.params[n].to_unconstrained(
            model.params[n].value)))) for n in self.free + self.numeric}
        sizes = {n: int(np.prod(self._shapes[n])) for n in self.free}
        offsets = np.cumsum([0] + [sizes[n] for n in self.free])
        #: columns of the quadratic-surrogate parameters among the free ones
        self._numeric_cols = np.concatenate([np.arange(offsets[i], offsets[i] + sizes[n])
                                             for i, n in enumerate(self.free) if n in self.numeric] or
                                            [np.zeros(0, int)]).astype(int)

    @staticmethod
    def validate_options(*args: Any, mc_size: Any = None, num_chains: int = 10, surrogate: str = "auto",
                         max_missing_fraction: float | None = None, trust_radius: float | None = None,
                         score_draws: int | None = None, bound: str = "jj", expand: str = "location",
                         accelerate: bool | int | None = None, **kwargs: Any) -> None:
        """Refuse bad options before any model is read (the front doors call it when built)."""
        if args and args[0] is None:  # num_epochs: the surrogate's default
            args = (1, *args[1:])
        if kwargs.get("num_epochs", 1) is None:
            kwargs["num_epochs"] = 1
        StatEngine.validate_options(*args, **kwargs)
        if mc_size is not None and not callable(mc_size) and int(mc_size) < 1:
            raise ValueError(f"mc_size must be >= 1 or a schedule of the epoch, got {mc_size!r}")
        if int(num_chains) < 1:
            raise ValueError(f"num_chains must be >= 1, got {num_chains}")
        if surrogate not in SURROGATE_OPTIONS:
            raise ValueError(f"surrogate must be one of {SURROGATE_OPTIONS}, got {surrogate!r}")
        if max_missing_fraction is not None and not 0.0 <= float(max_missing_fraction) < 1.0:
            raise ValueError(f"max_missing_fraction must be in [0, 1), got {max_missing_fraction!r}")
        if trust_radius is not None and not float(trust_radius) > 0.0:
            raise ValueError(f"trust_radius must be > 0, got {trust_radius!r}")
        if score_draws is not None and int(score_draws) < 1:
            raise ValueError(f"score_draws must be >= 1 or None, got {score_draws!r}")
        if bound not in ("bohning", "jj"):
            raise ValueError(f"bound must be 'bohning' or 'jj', got {bound!r}")
        if expand not in EXPANSIONS:
            raise ValueError(f"expand must be one of {EXPANSIONS}, got {expand!r}")
        if accelerate is not None and accelerate is not False and surrogate in ("louis", "paper"):
            raise ValueError(f"accelerate is an option of surrogate='bohning' (and of 'auto', where it applies when "
                             f"'bohning' is chosen); surrogate={surrogate!r} does not take it ('louis' accelerates "
                             "its own step)")
        if not (accelerate is None or isinstance(accelerate, bool) or
                (isinstance(accelerate, (int, np.integer)) and accelerate >= 0)):
            raise ValueError(f"accelerate must be a bool or an epoch >= 0, got {accelerate!r}")

    def _check_model(self) -> None:
        model = self.model
        if model.latent_dim == 0:
            raise ModelSpecificationError("MISSO needs latent variables per unit; this model has none")
        if not model.has_stats and not model.numeric_params:
            raise ModelSpecificationError("MISSO: the model has no free parameter to estimate")

    def distribute(self) -> None:
        """:meth:`MiniBatchMCEM.distribute`; with ``surrogate="auto"``, every process must have chosen alike (each
        read its own block of the units): refused with every process's choice otherwise."""
        super().distribute()
        if self._surrogate_option == "auto":
            chosen = self.ops.gather_objects(self.surrogate)
            if len(set(chosen)) > 1:
                raise ValueError(f"MISSO surrogate='auto' chose {chosen} on the processes (rank order; 'louis' where "
                                 "the process's block of the units is refused by the 'bohning' surrogate): pass "
                                 "surrogate= explicitly")

    # ----- the surrogates of a mini-batch --------------------------------------------------------------
    def _draws(self, t: Any) -> Any:
        """Draws of the L chains per visit at inner iteration t: ``⌈M_k / L⌉`` (at least 1)."""
        epoch = (t - 1) // self.num_batches
        m = self.mc_size(epoch)
        sweeps = (m + self.num_samples - 1) // self.num_samples
        return sweeps * (sweeps > 0) + 1 * (sweeps <= 0)

    def _missing_cap(self, epoch: Any) -> Any:
        """The cap on the missing fraction in epoch k (from 0): ``min(max_missing_fraction, 1 − 2^−k)``."""
        ramp, top = 1.0 - 0.5 ** (epoch * 1.0), self.max_missing_fraction
        return ramp * (ramp < top) + top * (ramp >= top)

    def surrogates(self, state: MISSOState, theta: dict[str, Any], units: Any, key: Any,
                   num_draws: Any) -> tuple[Stats, Any, Any, Any, MISSOState]:
        """Monte-Carlo surrogates of ``units`` at θ from ``num_draws`` draws of the chains: statistic rows ``[b, ...]``
        (closed-form parameters), the quadratic-surrogate gradients ``ĝ_i`` ``[b, q]`` (mean over every draw), the
        complete-data curvature ``Σ_{i∈B} I_c,i`` of the free parameters and (``"louis"``) their missing information
        ``Σ_{i∈B} I_m,i`` from the scores of the first ``score_draws`` draws (``[p, p]``; zeros otherwise)."""
        model, ops, xp = self.model, self.ops, self.ops.xp
        names = self.free
        fixed = {n: v for n, v in theta.items() if n not in names}
        x0 = flatten(ops, model.unconstrain({n: theta[n] for n in names}), names)
        p = len(x0) if names else 0
        q = len(self._numeric_cols)
        louis = self.surrogate == "louis" and p > 0
        pick = self._pick() if p else None  # [p, q] one-hot (None: every free parameter is a quadratic-surrogate one)

        prior = self._prior_only

        def complete_fn(z: Any) -> Callable[[Any], Any]:
            def complete(x: Any) -> Any:
                th = dict(fixed)
                th.update(model.constrain(unflatten(x, names, self._shapes)))
                if prior is not None:  # θ enters the latents' prior only: the same scores and curvature
                    return prior(th, z, units)
                return model.log_joint(th, z, units)  # [L, b]

            return complete

        per_unit = self.rng == "per_unit"
        empty = self._no_units(units)  # a distributed fit's process holding none of the batch: zeros, same draws

        def draw(st: MISSOState, kk: Any, chain: Any = None) -> tuple[Stats, Any, MISSOState, Any]:
            """One draw of the batch's latents ``[L, b, d]``; ``chain``: the MH chains' state (densities included) as
            the visit's previous draw left it, None at its first draw (the chains are then evaluated at θ)."""
            if model.has_posterior_sampler and per_unit:
                z = model.sample_posterior(theta, self._visit_key(kk), self.num_samples, units,
                                           sim=self._sim_ops(units))
            elif model.has_posterior_sampler:
                z = model.sample_posterior(theta, kk, self.num_samples, units)
            else:
                chain, st = self._sweep_chains(st, theta, units, kk, chain)
                z = chain.z
            if not self.by_stats:
                return {}, z, st, chain
            if empty and not model.has_posterior_sampler:  # rows of the statistics' shape, none of them
                one = ops.arange(1)
                z1 = xp.swapaxes(take_units(ops, st.z, one, 0), 0, 1)
                return {k: xp.mean(v, 0)[:0] for k, v in model.stats_rows(theta, z1, one).items()}, z, st, chain
            return {k: xp.mean(v, 0) for k, v in model.stats_rows(theta, z, units).items()}, z, st, chain

        def scored(st: MISSOState, kk: Any, chain: Any = None) -> tuple[Stats, Any, Any, Any, MISSOState, Any]:
            """A draw with the scores of every free parameter: −mean over chains ``[b, p]`` and Σ s sᵀ (Louis)."""
            rows, z, st, chain = draw(st, kk, chain)
            if not p or empty:
                return rows, ops.zeros((len(units), p)), ops.zeros((p, p)), z, st, chain
            scores = forward_jacobian(ops, complete_fn(z), x0)  # [L, b, p]
            flat = xp.reshape(scores, (-1, p))
            outer = flat.T @ flat if louis else ops.zeros((p, p))  # Σ_{chains, units} s sᵀ
            return rows, -xp.mean(scores, 0), outer, z, st, chain

        def numeric_grad(z: Any) -> Any:
            """−mean over chains of the quadratic-surrogate parameters' scores ``[b, q]`` (forward mode in q only)."""
            if not q or empty:
                return ops.zeros((len(units), q))
            if pick is None:  # every free parameter has the quadratic surrogate
                return -xp.mean(forward_jacobian(ops, complete_fn(z), x0), 0)
            x0q = x0 @ pick
            return -xp.mean(forward_jacobian(ops, lambda xq: complete_fn(z)(x0 + pick @ (xq - x0q)), x0q), 0)

        # the first draw uses ``key`` as MiniBatchMCEM's oracle does (same streams); later draws a key of index
        # 2·mcmc_steps + 1, which the chains' own split of ``key`` (2·mcmc_steps + 1 keys) never hands out
        rows, g, outer, z, state, chain = scored(state, key)
        key = ops.split(key, 2 * self.mcmc_steps + 2)[-1]
        # the complete-data curvature of the batch's surrogate: at the first draw (an estimate; the visits average it)
        h = -ops.hessian(lambda x: xp.sum(xp.mean(complete_fn(z)(x), 0)), vectorize=True)(x0) if p and not empty \
            else ops.zeros((p, p))
        keys = ops.split(key, 2)

        def body(i: Any, carry: Any) -> Any:
            r_acc, g_acc, o_acc, st, kk, ch = carry
            kk, sub = ops.split(kk)
            r, gi, oi, _, st, ch = scored(st, sub, ch)
            return ({k: r_acc[k] + r[k] for k in r_acc}, g_acc + gi, o_acc + oi, st, kk, ch)

        # further scored draws (a dynamic count on JAX: a traced loop bound); the paper's surrogates score every draw
        limit = self.score_draws if louis else None  # None: every draw
        num_scored = num_draws if limit is None else num_draws + (limit - num_draws) * (num_draws > limit)
        rows, g, outer, state, kk, chain = ops.fori_loop(1, num_scored, body, (rows, g, outer, state, keys[0], chain))
        inv = 1.0 / num_draws
        if louis:
            # the remaining draws refresh the statistics and the quadratic surrogates' gradients only (the same
            # key sequence as scored draws: the draws, hence the statistics, do not depend on ``score_draws``)
            def rest(i: Any, carry: Any) -> Any:
                r_acc, g_acc, st, kk, ch = carry
                kk, sub = ops.split(kk)
                r, z, st, ch = draw(st, sub, ch)
                return ({k: r_acc[k] + r[k] for k in r_acc}, g_acc + numeric_grad(z), st, kk, ch)

            g_num = g if pick is None else g @ pick
            rows, g_num, state, _, _ = ops.fori_loop(num_scored, num_draws, rest, (rows, g_num, state, kk, chain))
            g_num = g_num * inv
            # Louis: Σ_i Cov_m(s_{i,m}) over the M = scored draws × chains scores per unit (unbiased; 0 when M = 1)
            g = g * (1.0 / num_scored)
            num_scores = num_scored * self.num_samples
            missing = (outer - num_scores * (g.T @ g)) / (num_scores - 1 + 1 * (num_scores == 1))
        else:
            g_num = g * inv
            missing = ops.zeros((p, p))
        # the batch's sums over every process (a distributed fit; float64 all-reduces): every process steps alike
        return {k: v * inv for k, v in rows.items()}, g_num, ops.all_sum(h), ops.all_sum(missing), state

    def _pick(self) -> Any:
        """``[p, q]`` one-hot selection of the quadratic-surrogate parameters among the free ones (no integer
        indexing: the same on both backends); None when they are all of them."""
        if len(self.free) == len(self.numeric):
            return None
        p = sum(int(np.prod(self._shapes[n])) for n in self.free)
        pick = np.zeros((p, len(self._numeric_cols)))
        pick[self._numeric_cols, np.arange(len(self._numeric_cols))] = 1.0
        return self.ops.asarray(pick)

    def _numeric_block(self, h: Any) -> Any:
        """The quadratic-surrogate parameters' block of the free parameters' curvature ``[p, p]``."""
        pick = self._pick() if int(h.shape[-1]) else None
        return h if pick is None else pick.T @ h @ pick

    # ----- engine protocol ------------------------------------------------------------------------------
    def oracle(self, state: MISSOState, theta: dict[str, Any], units: Any,
               key: Any) -> tuple[Stats, MISSOState]:
        """The statistic rows of one visit with ``num_chains`` draws (MiniBatchMCEM's oracle)."""
        rows, _, _, _, state = self.surrogates(state, theta, units, key, 1)
        return rows, state

    def unit_axes(self) -> dict[str, Any]:
        """The per-unit surrogate rows (fields of ``memory``) and the MH chains ``z`` hold the units on axis 0."""
        if self.surrogate == "bohning":
            rows = {"curv_rows": 0, "lin_rows": 0}
            if getattr(self, "_px_map", None) is not None:
                rows.update(eps_rows=0, eps2_rows=0)
            if self.accelerate:
                rows.update(grad=0, visited_at=0)
            return {"memory": rows, "z": 0}
        tables = (["table"] if self.by_stats else []) + (["anchor", "grad"] if self.numeric else []) + \
            (["visited_at"] if self.surrogate == "louis" and self.free else [])
        axes: dict[str, Any] = {"memory": {name: 0 for name in tables}}
        if not self.model.has_posterior_sampler:
            axes["z"] = 0
        return axes

    def init(self, key: Any) -> MISSOState:
        """θ⁰, the chains' prior draws and every unit's surrogate built at θ⁰ (``⌈M_0 / L⌉`` draws per unit)."""
        if self.surrogate == "bohning":
            return self._bohning_init(key)
        model, ops, xp = self.model, self.ops, self.ops.xp
        theta = self.start_params()
        #: the pruned scores (:func:`~latentfit.inference.mcmcsgd.prior_only_log_density`)
        self._prior_only = prior_only_log_density(model, self.free, self._shapes, theta) if self.prune else None
        state = MISSOState(theta=theta, key=key)
        if not model.has_posterior_sampler:
            key, k0 = ops.split(key)
            z = self._initial_chains(theta, k0)  # [L, n, d] (rng="per_unit": each unit's stream)
            sd = xp.std(xp.reshape(ops.gather_units(z, 1), (-1, z.shape[-1])), 0)  # every process's draws
            state = state._replace(z=xp.swapaxes(z, 0, 1) + 0.0, rw_scale=0.5 * xp.where(sd > 0, sd, 1.0),
                                   num_nonfinite=ops.zeros(()))
        key, k1 = ops.split(key)
        n, total = model.num_units, self._total_units  # this process's units, every process's
        rows, g, h_free, missing, state = self.surrogates(state, theta, ops.arange(n), k1, self._draws(1))
        h = self._numeric_block(h_free)
        memory = MISSOMemory(table=rows, s_run=self.reduce(rows, None))
        if self.numeric:
            x0 = flatten(ops, model.unconstrain({k: theta[k] for k in self.numeric}), self.numeric)
            anchor = xp.reshape(x0, (1, -1)) + ops.zeros((n, len(x0)))
            memory = memory._replace(anchor=anchor, grad=g, sum_anchor=ops.all_sum(xp.sum(self.real_rows(anchor), 0)),
                                     sum_grad=ops.all_sum(xp.sum(self.real_rows(g), 0)), curvature=h / total)
        if self.surrogate == "louis" and self.free:
            x_free = flatten(ops, model.unconstrain({k: theta[k] for k in self.free}), self.free)
            visited_at = xp.reshape(x_free, (1, -1)) + ops.zeros((n, len(x_free)))
            memory = memory._replace(info_complete=h_free / total, info_missing=missing / total,
                                     visited_at=visited_at,
                                     sum_visited_at=ops.all_sum(xp.sum(self.real_rows(visited_at), 0)),
                                     last_step=0.0 * x_free, last_full=0.0 * x_free, damping=1.0 + 0.0 * x_free[0])
        return state._replace(memory=memory, key=key)

    def inner(self, state: MISSOState, bi: Any, bj: Any, t: Any, key: Any) -> MISSOState:
        """Refresh the surrogates of the batch ``bi`` at θ, then θ = argmin of the summed surrogates (``"louis"``:
        that step accelerated).  Returns a new record; on torch the per-unit rows of ``memory`` and the chains are
        updated in place, as the EM family's tables are (the epoch's state is consumed)."""
        if self.surrogate == "bohning":
            return self._bohning_inner(state, bi, t, key)
        model, ops, xp = self.model, self.ops, self.ops.xp
        theta = state.theta
        n, b = self._total_units, self.batch_size  # every process's units; the global batch size
        rows, g, h_free, missing, state = self.surrogates(state, theta, bi, key, self._draws(t))
        h = self._numeric_block(h_free)
        mem = state.memory
        new_theta = dict(theta)
        if self.by_stats:
            delta = self.reduce(s_sub(rows, s_take(ops, mem.table, bi)), bi)
            s_run = {k: v + delta[k] for k, v in mem.s_run.items()}
            mem = mem._replace(s_run=s_run, table=s_put(ops, mem.table, bi, rows))
            new_theta.update(model.m_step(s_run, theta, n))
        if self.numeric:
            x = flatten(ops, model.unconstrain({k: theta[k] for k in self.numeric}), self.numeric)
            old_anchor, old_grad = take_units(ops, mem.anchor, bi), take_units(ops, mem.grad, bi)
            new_anchor = xp.reshape(x, (1, -1)) + 0.0 * old_anchor
            sum_anchor = mem.sum_anchor + ops.all_sum(xp.sum(self.real_rows(new_anchor - old_anchor, bi), 0))
            sum_grad = mem.sum_grad + ops.all_sum(xp.sum(self.real_rows(g - old_grad, bi), 0))
            # per-unit curvature, a running average over the visits (an epoch's worth of memory)
            curvature = mem.curvature + (b / n) * (h / b - mem.curvature)
            x_new = sum_anchor / n - _solve_psd(ops, curvature, sum_grad / n)
            mem = mem._replace(anchor=put_units(ops, mem.anchor, bi, new_anchor), grad=put_units(ops, mem.grad, bi, g),
                               sum_anchor=sum_anchor, sum_grad=sum_grad, curvature=curvature)
            new_theta.update(model.constrain(unflatten(x_new, self.numeric, self._shapes)))
        if self.surrogate == "louis" and self.free:
            # Louis' acceleration of the step: Δ ← (I_c − I_m)⁻¹ I_c Δ, the missing fraction capped, trust region
            info_c = mem.info_complete + (b / n) * (h_free / b - mem.info_complete)
            info_m = mem.info_missing + (b / n) * (missing / b - mem.info_missing)
            names = self.free
            x_old = flatten(ops, model.unconstrain({k: theta[k] for k in names}), names)
            x_em = flatten(ops, model.unconstrain({k: new_theta[k] for k in names}), names)
            # the θ at which each unit's surrogate was built (the batch's: now), for the staleness correction
            old_at = take_units(ops, mem.visited_at, bi)
            now_at = xp.reshape(x_old, (1, -1)) + 0.0 * old_at
            sum_at = mem.sum_visited_at + ops.all_sum(xp.sum(self.real_rows(now_at - old_at, bi), 0))
            cap = self._missing_cap((t - 1) // self.num_batches)
            step, full, damping = _accelerated_step(ops, info_c, info_m, x_em - x_old, sum_at / n - x_old, cap, n,
                                                    self.trust_radius, (mem.last_step, mem.last_full, mem.damping))
            new_theta.update(model.constrain(unflatten(x_old + step, names, self._shapes)))
            mem = mem._replace(info_complete=info_c, info_missing=info_m, sum_visited_at=sum_at,
                               visited_at=put_units(ops, mem.visited_at, bi, now_at), last_step=step, last_full=full,
                               damping=damping)
        return state._replace(theta=new_theta, memory=mem)

    # ----- surrogate="bohning": non-centred latents, Böhning's quadratic majorant -----------------------------------
    def _unit_total(self, rows: Any, units: Any = None) -> Any:
        """``Σ_i rows_i`` over the units of ``units`` (None: this process's) of every process: dummy and other
        processes' units' rows left out (:meth:`real_rows`), the sum all-reduced (a one-process fit: the plain sum)."""
        return self.ops.all_sum(self.ops.xp.sum(self.real_rows(rows, units), 0))

    def _bohning_theta(self, x: Any, px: tuple[Any, Any] | None = None) -> dict[str, Any]:
        """θ of the model from x: the latents' scales by their absolute value (the likelihood is even in their sign;
        floored at 1e-12, the scales' positivity constraint), times the working scales ``px`` if given."""
        xp, design = self.ops.xp, self._design
        sign_free = self._scale_mask
        x_model = xp.where(sign_free, xp.clip(xp.abs(x), 1e-12, None), x)
        if px is not None:  # the working parameters: scales |x| s, locs μ(x) + L(x) m
            scale, loc = px
            chol = design.moments(unflatten(x, design.names, design.shapes))[1]
            x_model = x_model * scale + (xp.diagonal(chol, 0, -2, -1) * loc) @ self._px_loc_map
        theta = dict(self._fixed_theta)  # fixed params, as θ⁰ has them
        theta.update(unflatten(x_model, design.names, design.shapes))
        return theta

    def _bohning_init(self, key: Any) -> MISSOState:
        """θ⁰, the design (:meth:`LatentModel.logistic_design`), the chains' prior draws, the surrogates at θ⁰."""
        model, ops, xp = self.model, self.ops, self.ops.xp
        theta = self.start_params()
        # ``surrogate="auto"`` read the design of this model at θ⁰ to choose: the same (a permuted or sharded view of
        # the model, :meth:`distribute`, is read again)
        cached, self._auto_design = self._auto_design, None
        design = self._design = cached[1] if cached is not None and cached[0] is model else \
            model.logistic_design(theta)
        names = design.names
        self._fixed_theta = {k: v for k, v in theta.items() if k not in names}
        x0 = ops.stop_gradient(flatten(ops, {k: theta[k] for k in names}, names))
        q = int(x0.shape[0])
        mask = np.zeros(q, bool)
        mask[np.asarray(design.scale_cols, int)] = True
        self._scale_mask = ops.asarray(mask, dtype=None)

        def mean_of(x: Any) -> Any:
            return design.moments(unflatten(x, names, design.shapes))[0]

        def chol_of(x: Any) -> Any:
            return design.moments(unflatten(x, names, design.shapes))[1]

        # z = μ(x) + L(x) ε is linear in x (Normal patterns: μ = loc, L = diag(scale)): its Jacobian is constant
        self._jac_mean = ops.stop_gradient(forward_jacobian(ops, mean_of, x0))  # [d, q]
        self._jac_chol = ops.stop_gradient(xp.swapaxes(forward_jacobian(ops, chol_of, x0), -1, -2))  # [d, q, d]
        self._eye_q = ops.asarray(np.eye(q)) + 0.0 * x0[0]
        self._px_map = self._working_scale_map() if self.expand != "none" else None
        state = MISSOState(theta=theta, key=key)
        key, k0 = ops.split(key)
        z = self._initial_chains(theta, k0)  # [L, n, d]
        sd = xp.std(xp.reshape(ops.gather_units(z, 1), (-1, z.shape[-1])), 0)
        state = state._replace(z=xp.swapaxes(z, 0, 1) + 0.0, rw_scale=0.5 * xp.where(sd > 0, sd, 1.0),
                               num_nonfinite=ops.zeros(()))
        key, k1 = ops.split(key)
        n, draws0 = model.num_units, self._draws(1)

        def first_visit(st: MISSOState, x: Any, kk: Any) -> tuple[Any, Any, Any, MISSOState]:
            return self._bohning_visit(st, x, ops.arange(n), kk, draws0)

        # one compiled program on JAX (eagerly, op by op, the visit took ~1.8 s of a 3.4 s fit at N = 400)
        curv, grad, eps2, state = ops.jit(first_visit)(state, x0, k1)  # eps2: (ε̄, ε̂²) [n, d] each
        lin = (curv @ x0[:, None])[..., 0] - grad
        total = self._unit_total
        memory = MISSOMemory(table={}, s_run={}, curv_rows=curv, lin_rows=lin, sum_curv=total(curv),
                             sum_lin=total(lin), x=x0 + 0.0)
        if self._px_map is not None:
            eps, eps2 = eps2
            memory = memory._replace(eps_rows=eps, eps2_rows=eps2, sum_eps=total(eps), sum_eps2=total(eps2),
                                     px=0.0 * x0 + 1.0, px_loc=0.0 * eps[0])
        if self.accelerate:
            at = xp.reshape(x0, (1, -1)) + 0.0 * grad
            memory = memory._replace(grad=grad, sum_grad=total(grad), visited_at=at, sum_visited_at=total(at),
                                     sum_outer=total(grad[:, :, None] * grad[:, None, :]))
        return state._replace(memory=memory, key=key)

    def _working_scale_map(self) -> Any:
        """``[d, q]``: 1 where latent coordinate k's scale is x's column c (its chol's diagonal moves with x_c), each
        coordinate's scale one column; divided by the number of coordinates sharing the column (the working scale of a
        column is the root mean square of its coordinates' ε).  None where that structure is absent."""
        jc = np.asarray(self.ops.to_numpy(self._jac_chol))  # [d, q, d]
        d = jc.shape[0]
        diag = np.stack([jc[k, :, k] for k in range(d)]) if d else np.zeros((0, jc.shape[1]))  # [d, q]
        on = (np.abs(diag) > 0) & np.asarray(self.ops.to_numpy(self._scale_mask), bool)[None, :]
        if d == 0 or not np.all(on.sum(1) == 1):
            return None
        counts = on.sum(0)
        # the locations: coordinate k's loc is x's column c with coefficient 1 (or 0: no free loc, no working loc);
        # coordinates sharing a loc column share their scale column too (L(x) m is then a shift of that column), and
        # the column does not enter the logits (the shift leaves the likelihood unchanged)
        jm = np.asarray(self.ops.to_numpy(self._jac_mean))  # [d, q]
        design = self._design
        dd = int(np.shape(self.ops.to_numpy(design.curvature))[-1]) - jm.shape[1]
        diag_c = np.asarray(self.ops.to_numpy(self.ops.xp.diagonal(design.curvature, 0, -2, -1)))[:, dd:]  # [n, q]
        loc_on = np.abs(jm) > 0
        ok = np.all(loc_on.sum(1) <= 1) and np.all(np.abs(jm[loc_on] - 1.0) < 1e-12)
        for c in np.flatnonzero(loc_on.any(0)):
            dims = np.flatnonzero(loc_on[:, c])
            ok = ok and bool(np.all(diag[dims] == diag[dims[0]])) and not bool(np.any(diag_c[:, c] != 0))
        loc_on = loc_on if ok else np.zeros_like(loc_on)
        loc_counts = loc_on.sum(0)
        self._px_dims_loc = self.ops.asarray(loc_on.any(1).astype(float))  # [d]: 1 where m is free
        #: [d, q]: coordinate k's working shift L_kk m_k to its loc column, averaged over the column's coordinates
        self._px_loc_map = self.ops.asarray(loc_on / np.where(loc_counts > 0, loc_counts, 1)[None, :])
        self._px_loc_avg = self.ops.asarray((loc_on / np.where(loc_counts > 0, loc_counts, 1)[None, :]) @ loc_on.T)
        return self.ops.asarray(on / np.where(counts > 0, counts, 1)[None, :])

    def _working_params(self, sum_eps: Any, sum_eps2: Any) -> tuple[Any, Any]:
        """The working parameters minimising the summed surrogates' prior part ``Σ_i Σ_k (log s_k + E(ε_ik − m_k)² /
        (2 s_k²))``: the locations ``m [d]`` (the mean of ε̄ over units and the coordinates sharing k's loc column; 0
        where k has none) and the scales ``s [q]`` (``s_c²`` the mean of ``ε̂² − 2 m ε̄ + m²`` over units and c's
        coordinates at the scale columns, 1 elsewhere)."""
        xp = self.ops.xp
        n = self._total_units
        m = ((sum_eps / n) @ self._px_loc_avg.T) * self._px_dims_loc  # [d]
        centred = sum_eps2 / n - 2.0 * m * sum_eps / n + m * m  # [d]
        ms = centred @ self._px_map  # [q]: each scale column's mean over its coordinates (0 elsewhere)
        mask = self._scale_mask
        if self.expand == "location":
            return 1.0 + 0.0 * ms, m
        return xp.where(mask, xp.sqrt(xp.where(mask, ms, 1.0)), 1.0 + 0.0 * ms), m

    def _bohning_visit(self, state: MISSOState, x: Any, units: Any, key: Any, num_draws: Any,
                       px: Any = None) -> tuple[Any, Any, Any, MISSOState]:
        """The surrogates of ``units`` at x (the chains at θ = :meth:`_bohning_theta` ``(x, px)``) from ``num_draws``
        draws of their chains: ``(B̂ [b, q, q], ĝ [b, q], ε̂² [b, d], state)``, ``ĝ_i = −mean_m ∇_x log f_i(ε_{i,m}; x)``,
        ``B̂_i = mean_m Σ_r c_r w_r w_rᵀ`` (plus a ridge of 1e-10 of its mean diagonal), ``w_r = ∂η_r/∂x`` at the draw's
        non-centred latents ``ε = L(x)⁻¹ (z − μ(x))``, and ``ε̂²_i = mean_m ε_{i,m}²``."""
        ops, xp, design = self.ops, self.ops.xp, self._design
        theta = self._bohning_theta(x, px)
        eye = self._eye_q
        mean, chol = design.moments(unflatten(x, design.names, design.shapes))  # the signed scales
        inv_chol_t = xp.swapaxes(xp.linalg.inv(chol), -1, -2)

        def one(st: MISSOState, kk: Any, chain: Any) -> tuple[Any, Any, Any, MISSOState, Any]:
            chain, st = self._sweep_chains(st, theta, units, kk, chain)
            g, b = self._bohning_terms(x, chain.z, units)
            eps = (chain.z - mean) @ inv_chol_t
            return xp.mean(g, 0), xp.mean(b, 0), xp.mean(eps, 0), xp.mean(eps * eps, 0), st, chain

        kk = ops.split(key, 2 * self.mcmc_steps + 2)[-1]
        if ops.jittable:
            # the first draw inside the loop too, so that the compiled visit holds one copy of the sweep and the
            # terms, not two: the chains evaluated at θ before the loop (their faults counted now, as the first sweep
            # would), and the first draw's key ``key``, as before.  The tutorial-style grouped NumPyro model of
            # tests/test_misso_bohning.py (60 groups, 801 rows), fresh process: first fit 15.7-17.7 -> 13.3-14.3 s
            # wall (compiling 12.1-13.7 -> 10.0-10.8 s), a second fit 0.80-0.92 -> 0.59-0.62 s; the same draws, the
            # estimates moved at rounding level (<= 2e-15 relative: XLA's other fusion of the loop)
            chain = start_chain(ops, state.z, units, lambda z: self.model.log_densities(theta, z, units))
            state = state._replace(num_nonfinite=state.num_nonfinite + chain.num_nonfinite)
            nb, q, d = int(units.shape[0]), int(x.shape[0]), int(chol.shape[-1])
            zeros = (ops.zeros((nb, q), dtype=x.dtype), ops.zeros((nb, q, q), dtype=x.dtype),
                     ops.zeros((nb, d), dtype=x.dtype), ops.zeros((nb, d), dtype=x.dtype))

            def body(i: Any, carry: Any) -> Any:
                g_acc, b_acc, e1_acc, e2_acc, st, kk, ch = carry
                kk_next, sub = ops.split(kk)
                first = i == 0
                g1, b1, f1, f2, st, ch = one(st, xp.where(first, key, sub), ch)
                return g_acc + g1, b_acc + b1, e1_acc + f1, e2_acc + f2, st, xp.where(first, kk, kk_next), ch

            g, b, e1, e2, state, _, _ = ops.fori_loop(0, num_draws, body, (*zeros, state, kk, chain))
        else:  # eager (torch): the first draw evaluates the chains at θ itself
            g, b, e1, e2, state, chain = one(state, key, None)

            def body(i: Any, carry: Any) -> Any:
                g_acc, b_acc, e1_acc, e2_acc, st, kk, ch = carry
                kk, sub = ops.split(kk)
                g1, b1, f1, f2, st, ch = one(st, sub, ch)
                return g_acc + g1, b_acc + b1, e1_acc + f1, e2_acc + f2, st, kk, ch

            g, b, e1, e2, state, _, _ = ops.fori_loop(1, num_draws, body, (g, b, e1, e2, state, kk, chain))
        inv = 1.0 / num_draws
        b = b * inv
        ridge = 1e-10 * xp.mean(xp.diagonal(b, 0, -2, -1), -1) + 1e-300
        return b + ridge[:, None, None] * eye, g * inv, (e1 * inv, e2 * inv), state

    def _bohning_terms(self, x: Any, z: Any, units: Any) -> tuple[Any, Any]:
        """One draw's quadratic majorant of ``−log f_i(ε; ·)`` at x for every unit of ``units`` and chain: its gradient
        ``−∇_x log p(y_i | μ(x) + L(x) ε_i, x)`` ``[L, b, q]`` and curvature ``Σ_r c_r w_r w_rᵀ`` ``[L, b, q, q]``
        (``c_r``: Jaakkola–Jordan's ``(σ(η_r) − ½)/η_r`` at the draw, ``bound="jj"``, or Böhning's ¼), where
        ``ε_i = L(x)⁻¹ (z_i − μ(x))`` are the non-centred latents of the draws ``z [L, b, d]`` and ``w_r = ∂η_r/∂x``."""
        ops, xp, design = self.ops, self.ops.xp, self._design
        theta = self._bohning_theta(x)
        mean, chol = design.moments(unflatten(x, design.names, design.shapes))  # the signed scales
        eps = (z - mean) @ xp.swapaxes(xp.linalg.inv(chol), -1, -2)
        jac = self._jac_mean + xp.sum(eps[..., None, None, :] * self._jac_chol, -1)  # ∂z/∂x [L, b, d, q]
        eye = self._eye_q
        k = xp.concatenate([jac, xp.broadcast_to(eye, tuple(jac.shape[:-2]) + tuple(eye.shape))], -2)  # [L, b, D, q]
        kt = xp.swapaxes(k, -1, -2)
        sc, jj = design.scores(theta, z, units)  # [L, b, D], [L, b, D, D]
        curv = jj if self.bound == "jj" else take_units(ops, design.curvature, units)[None]
        return -(kt @ sc[..., None])[..., 0], kt @ curv @ k

    def _bohning_inner(self, state: MISSOState, bi: Any, t: Any, key: Any) -> MISSOState:
        """Refresh the batch's surrogates at x^k, then x^{k+1} = (Σ_i B̂_i)⁻¹ Σ_i (B̂_i x_i − ĝ_i), the exact minimiser
        of the summed quadratic majorants."""
        ops = self.ops
        mem = state.memory
        x = mem.x
        px = None if mem.px is None else (mem.px, mem.px_loc)
        curv, grad, (eps, eps2), state = self._bohning_visit(state, x, bi, key, self._draws(t), px)
        lin = (curv @ x[:, None])[..., 0] - grad
        total = self._unit_total
        sum_curv = mem.sum_curv + total(curv - take_units(ops, mem.curv_rows, bi), bi)
        sum_lin = mem.sum_lin + total(lin - take_units(ops, mem.lin_rows, bi), bi)
        x_new = ops.solve(sum_curv, sum_lin[:, None])[:, 0]
        if self.accelerate:
            x_new, mem = self._bohning_accelerate(mem, x, x_new, grad, sum_curv, bi, t)
        mem = mem._replace(curv_rows=put_units(ops, mem.curv_rows, bi, curv),
                           lin_rows=put_units(ops, mem.lin_rows, bi, lin),
                           sum_curv=sum_curv, sum_lin=sum_lin, x=x_new)
        if mem.px is not None:
            sum_eps = mem.sum_eps + total(eps - take_units(ops, mem.eps_rows, bi), bi)
            sum_eps2 = mem.sum_eps2 + total(eps2 - take_units(ops, mem.eps2_rows, bi), bi)
            scale, loc = self._working_params(sum_eps, sum_eps2)
            mem = mem._replace(eps_rows=put_units(ops, mem.eps_rows, bi, eps), sum_eps=sum_eps,
                               eps2_rows=put_units(ops, mem.eps2_rows, bi, eps2), sum_eps2=sum_eps2, px=scale,
                               px_loc=loc)
        theta = dict(state.theta)
        theta.update(self._bohning_theta(x_new, None if mem.px is None else (mem.px, mem.px_loc)))
        return state._replace(theta=theta, memory=mem)

    def _bohning_accelerate(self, mem: MISSOMemory, x: Any, x_mm: Any, grad: Any, sum_curv: Any, bi: Any,
                            t: Any) -> tuple[Any, MISSOMemory]:
        """``accelerate=True``: the majorise-minimise step ``x_mm − x`` accelerated as Louis' step of ``"louis"``
        (:func:`_accelerated_step`), with the summed majorants' curvature ``B̄ = Σ_i B̂_i / n`` as the complete
        information and ``B̄ − Î_obs`` as the missing one; ``Î_obs`` is the per-unit observed information estimated by
        the centred outer products of the units' stored scores, ``(1/n) Σ_i (ĝ_i − ḡ)(ĝ_i − ḡ)ᵀ`` (the Fisher
        identity makes ``−ĝ_i`` unit i's marginal score at its last visit; Berndt, Hall, Hall & Hausman 1974).  The
        majorant's rate is ``I − B̄⁻¹ I_obs`` per epoch: 0.96 in the weakly identified direction of the benchmark's data
        seed 2; the accelerated step takes a linear map to its fixed point in one step, the missing fractions capped
        at ``max_missing_fraction`` (ramped as ``"louis"``) and the excess over the MM step at ``trust_radius`` SEs."""
        ops, xp = self.ops, self.ops.xp
        n = self._total_units
        old_g, old_at = take_units(ops, mem.grad, bi), take_units(ops, mem.visited_at, bi)
        now_at = xp.reshape(x, (1, -1)) + 0.0 * old_at
        total = self._unit_total
        sum_grad = mem.sum_grad + total(grad - old_g, bi)
        sum_outer = mem.sum_outer + total(grad[:, :, None] * grad[:, None, :] - old_g[:, :, None] * old_g[:, None, :],
                                          bi)
        sum_at = mem.sum_visited_at + total(now_at - old_at, bi)
        mean_g = sum_grad / n
        observed = sum_outer / n - mean_g[:, None] * mean_g[None, :]
        complete = sum_curv / n
        epoch = (t - 1) // self.num_batches - self.accelerate_from
        cap = self._missing_cap(epoch) * (epoch >= 0)
        excess = x + _accelerated_step(ops, complete, complete - observed, x_mm - x, sum_at / n - x, cap, n,
                                       self.trust_radius) - x_mm
        # no latent scale shrunk below half the MM point's by the excess (the non-centred latents ε = (z − μ) / ω of
        # the chains' draws grow as 1 / ω): the excess shortened to the largest fraction that keeps every scale there
        # (a scale near 0 is a stationary point of the likelihood, even in each scale: an extrapolated step there is
        # noise, and the chains' ε explode); clipping the scales' coordinates alone instead bent the step and diverged
        toward_zero = self._scale_mask & (excess * x_mm < 0)
        shrink = xp.where(toward_zero, -0.5 * x_mm / xp.where(toward_zero, excess, 1.0), 1.0)
        x_acc = x_mm + xp.clip(xp.min(shrink), 0.0, 1.0) * excess
        mem = mem._replace(grad=put_units(ops, mem.grad, bi, grad), sum_grad=sum_grad, sum_outer=sum_outer,
                           visited_at=put_units(ops, mem.visited_at, bi, now_at), sum_visited_at=sum_at)
        return x_acc, mem


def _floored_eigh(ops: Any, h: Any) -> tuple[Any, Any]:
    """Eigen-decomposition of the symmetrised ``h`` with |λ| floored at 1e-6 of the largest (a positive matrix)."""
    xp = ops.xp
    w, v = ops.eigh(0.5 * (h + h.T))
    w_abs = xp.abs(w)
    floor = CURVATURE_FLOOR * xp.max(w_abs) + 1e-12
    return xp.where(w_abs < floor, floor, w_abs), v


def _solve_psd(ops: Any, h: Any, g: Any) -> Any:
    """``H⁺ g`` with H symmetrised and its eigenvalues made positive (|λ| floored at 1e-6 of the largest)."""
    w, v = _floored_eigh(ops, h)
    return v @ ((v.T @ g) / w)


def _accelerated_step(ops: Any, complete: Any, missing: Any, step: Any, stale: Any, max_fraction: Any,
                      num_units: int, radius: float, guard: tuple[Any, Any, Any] | None = None) -> Any:
    """Louis' (1982) acceleration of the incremental EM-type ``step`` Δ from x: ``(I_c − I_m)⁻¹ I_c Δ_full``, with
    the missing fraction capped and the excess over Δ limited to ``radius`` standard errors.

    ``Δ_full = Δ − J (x̄ − x)`` is the step a full refresh at x would have made: the summed surrogates were built at
    the units' last visits, whose mean is x̄ (``stale = x̄ − x``), and to first order the EM map moves with the θ of
    its statistics by its Jacobian ``J = I_c⁻¹ I_m`` (without this correction the acceleration of an incremental step
    is unstable: with two half-batches and a missing fraction 0.95 the error is multiplied by −10 per iteration).
    With ``I_c = C Cᵀ`` (``C = U diag(√w)``), ``R = C⁻¹ I_m C⁻ᵀ = V diag(λ) Vᵀ`` (the fractions of missing
    information), ``λ̃ = clip(λ, 0, max_fraction)``, ``y = Vᵀ Cᵀ Δ`` and ``d = Vᵀ Cᵀ (x̄ − x)``: the accelerated step
    is ``C⁻ᵀ V (y − λ̃ d) / (1 − λ̃)``, which takes a linear EM map to its fixed point in one step.  Its excess
    ``e`` over Δ (in these coordinates) has the squared length ``n Σ_j (1 − λ̃_j) e_j²`` in the metric of the capped
    observed information ``C V diag(1 − λ̃) Vᵀ Cᵀ`` (standard errors), and is shrunk by ``min(1, radius / length)``.

    ``guard = (s, Δ⁻, γ)``, the previous step, the full EM step it accelerated and the guard's factor (``"louis"``):
    the excess is also multiplied by γ, and ``(step, Δ_full, γ')`` is returned (the step alone without ``guard``).
    The overshoot guard: for a linear EM map, the EM step after a step s is ``Δ_full = Δ⁻ − (I − J) s``, so along s
    (the metric ``I_c``) ``a = ⟨Δ⁻, s⟩ / ⟨s, s⟩`` is the fraction of s the EM step made and ``a − ⟨Δ_full, s⟩ / ⟨s, s⟩``
    the one the true map made: the error along s was multiplied by ``ρ = ⟨Δ_full, s⟩ / (a ⟨s, s⟩)``, negative where
    the estimated missing fraction exceeded the true one, and below −1 where it exceeded ``(1 + λ) / 2`` (the step
    diverges).  Then ``γ' = γ / 2``, else ``γ' = min(1, 1.5 γ)``.  This does not depend on the estimates of λ: it
    catches their Monte-Carlo scatter above the true fraction (the masked-rows Gaussian random intercept of
    tests/test_misso.py, true λ 0.735, estimates capped at 0.9: 3 of 5 fits diverged without it, 10 of 10 reach the
    maximum with it), and on the logistic model (λ near 1), where noise alone triggers it, it fired on 0-3 of 26
    steps per fit and cost nothing measurable (ΔLL −0.26, −0.15, −0.18 against −0.27, −0.22, −0.18 on fit seeds 1-3).
    """
    xp = ops.xp
    w, u = _floored_eigh(ops, complete)
    c_inv_t = u / xp.sqrt(w)[None, :]  # C⁻ᵀ, and C⁻¹ = its transpose
    c_t = u * xp.sqrt(w)[None, :]  # C; Cᵀ = its transpose
    r = c_inv_t.T @ missing @ c_inv_t
    lam, v = ops.eigh(0.5 * (r + r.T))
    lam = xp.clip(lam, 0.0, max_fraction)
    y = v.T @ (c_t.T @ step)
    d = v.T @ (c_t.T @ stale)
    full = y - lam * d  # Δ_full in these coordinates
    excess = full / (1.0 - lam) - y
    length = xp.sqrt(num_units * xp.sum((1.0 - lam) * excess * excess))
    tau = radius / xp.where(length > radius, length, radius + 0.0 * length)
    if guard is None:
        return c_inv_t @ (v @ (y + tau * excess))
    last_step, last_full, damping = guard
    s_w, last_w = v.T @ (c_t.T @ last_step), v.T @ (c_t.T @ last_full)  # ⟨·,·⟩_{I_c}: dot products here
    ss = xp.sum(s_w * s_w)
    ss = xp.where(ss > 0, ss, 1.0 + 0.0 * ss)
    a, made = xp.sum(last_w * s_w) / ss, xp.sum(full * s_w) / ss
    diverging = (a > 0) & (made < -a) & (max_fraction > 0)
    recovered = xp.where(OVERSHOOT_RECOVER * damping < 1.0, OVERSHOOT_RECOVER * damping, 1.0 + 0.0 * damping)
    damping = xp.where(diverging, OVERSHOOT_SHRINK * damping, recovered)
    return c_inv_t @ (v @ (y + damping * tau * excess)), c_inv_t @ (v @ full), damping


__all__ = ["MISSO", "MISSOMemory", "MISSOState", "SURROGATES", "SURROGATE_OPTIONS", "auto_surrogate", "bohning_mc_size",
           "paper_mc_size"]

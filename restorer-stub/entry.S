/*
 * Entry and exits of the restorer stub (x86_64).
 *
 * stub_entry(plan): called by the launcher through ctypes as an ordinary C
 * function; rdi = the plan's address. It never returns: it leaves the
 * launcher's stack (which the stub is about to unmap) for the stub's own
 * stack in its .bss, and calls stub_main(plan).
 */
	.section .text.entry, "ax"
	.globl stub_entry
	.hidden stub_entry
	.type stub_entry, @function
stub_entry:
	lea	stub_stack_top(%rip), %rsp
	and	$-16, %rsp
	xor	%ebp, %ebp
	call	stub_main		/* noreturn */
	ud2
	.size stub_entry, . - stub_entry

/*
 * handover_gadget(frame_addr, gadget_syscall_ret, stub_start, stub_len):
 * rsp = frame_addr (whose first word, the pretcode slot, holds the address
 * of the target's own "mov $15,%rax; syscall"), then jump to the target's
 * "syscall; ret" with rax = munmap(stub_start, stub_len). The munmap
 * removes this code; the target's ret pops the pretcode slot and runs
 * rt_sigreturn with rsp = frame_addr + 8, which finds the frame at rsp - 8.
 */
	.text
	.globl handover_gadget
	.hidden handover_gadget
	.type handover_gadget, @function
handover_gadget:
	mov	%rsi, %r11
	mov	%rdi, %rsp
	mov	%rdx, %rdi
	mov	%rcx, %rsi
	mov	$11, %eax		/* __NR_munmap */
	jmp	*%r11
	.size handover_gadget, . - handover_gadget

/*
 * handover_sigreturn(sp): rsp = sp (= frame_addr + 8), rt_sigreturn. The
 * stub stays mapped (the fallback when the gadgets are missing).
 */
	.globl handover_sigreturn
	.hidden handover_sigreturn
	.type handover_sigreturn, @function
handover_sigreturn:
	mov	%rdi, %rsp
	mov	$15, %eax		/* __NR_rt_sigreturn */
	syscall
	ud2
	.size handover_sigreturn, . - handover_sigreturn

/*
 * The sa_restorer of the stub's own fault handlers. The kernel requires
 * SA_RESTORER on x86_64; the handlers never return, so it never runs.
 */
	.globl stub_sigreturn
	.hidden stub_sigreturn
	.type stub_sigreturn, @function
stub_sigreturn:
	mov	$15, %eax
	syscall
	ud2
	.size stub_sigreturn, . - stub_sigreturn

/* The stub's stack: part of the image's memsz (MEM_SIZE), never in the blob. */
	.section .bss.stack, "aw", @nobits
	.balign 64
stub_stack:
	.skip 65536
stub_stack_top:

	.section .note.GNU-stack, "", @progbits
